"""edge-voice: an offline voice assistant for kiosks and phone booths."""

__version__ = "0.1.0"
