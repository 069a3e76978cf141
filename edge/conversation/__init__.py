"""The conversation: one owner thread for the turn state machine, and the workers it drives.

- :mod:`~edge.conversation.core`: :class:`Conversation`, the owner and its state machine;
- :mod:`~edge.conversation.messages`: its inbox messages, states, triggers and outcomes;
- :mod:`~edge.conversation.turn`: a turn, a reply and the turn's timings;
- :mod:`~edge.conversation.responder`: the LLM worker (prefill, reply, clauses);
- :mod:`~edge.conversation.speech`: the speech worker (synthesis into the speaker);
- :mod:`~edge.conversation.mailbox`: the queues between them;
- :mod:`~edge.conversation.session`: conversation memory.
"""

from edge.conversation.core import Conversation, Snapshot
from edge.conversation.messages import Outcome, State, Trigger

__all__ = ["Conversation", "Outcome", "Snapshot", "State", "Trigger"]
