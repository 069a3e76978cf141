# CMake toolchain file: cross-compile for 64-bit ARM Linux (Raspberry Pi 5, Jetson Orin) on an
# x86_64 Debian/Ubuntu host with gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu.
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=scripts/arm64/aarch64-linux-gnu.cmake ...
#
# The compiler prefix can be overridden with -DCROSS_PREFIX=... (e.g. a versioned gcc).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED CROSS_PREFIX)
  set(CROSS_PREFIX aarch64-linux-gnu-)
endif()
set(CMAKE_C_COMPILER ${CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${CROSS_PREFIX}g++)
set(CMAKE_AR ${CROSS_PREFIX}ar CACHE FILEPATH "")
set(CMAKE_RANLIB ${CROSS_PREFIX}ranlib CACHE FILEPATH "")
set(CMAKE_STRIP ${CROSS_PREFIX}strip CACHE FILEPATH "")

# Headers and libraries come only from the cross sysroot, never from the x86_64 host;
# programs (cmake helpers, git) still run from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
