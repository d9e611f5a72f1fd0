"""The private jax APIs moe-jax relies on, each behind one small named function.

jax offers no public way to ask two things moe-jax needs before a backend starts:

- whether a backend is already running (the fake CPU device count is read once, when the
  first backend starts, so `request_cpu_devices` must know whether it is too late);
- after `jax.distributed.initialize`, which process this is and how many there are
  (`jax.process_index()` would start the backend, and in ``--coordinator auto`` mode the
  count decides how many fake CPU devices each process emulates, before the backend starts).

Both read ``jax._src`` internals. They live here, and only here, so that a jax upgrade that
moves them breaks one module; ``tests/test_compat.py`` checks that every attribute used
below exists and behaves as used, and fails loudly (naming the jax version) when it does not.
"""

from __future__ import annotations

import sys

PRIVATE_APIS = {
    "jax._src.xla_bridge": ("backends_are_initialized",),
    "jax._src.distributed": ("global_state",),
    "jax._src.lib": ("_jax",),
}
"""Each private jax module used here and the attributes read from it (what the compat test checks)."""


class JaxInternalsChanged(RuntimeError):
    """A private jax API moe-jax relies on is gone or changed shape (a jax upgrade): update moe_jax/compat.py."""


def _changed(what: str, error: BaseException) -> JaxInternalsChanged:
    import jax

    return JaxInternalsChanged(f"jax {jax.__version__} no longer provides {what} ({type(error).__name__}: {error}); "
                               "moe_jax/compat.py must be updated for this jax version")


def backend_started() -> bool:
    """True once jax has started a backend (its device count is then fixed for this process).

    Never imports jax or starts a backend just to ask. If jax's private API moved, answers
    True: callers then check the running backend's device count, which is always safe.
    """
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume started (tests/test_compat.py fails loudly)
        return True


def distributed_process() -> tuple[int, int]:
    """(this process's id, the process count) as `jax.distributed.initialize` left them, without starting a backend.

    Raises `JaxInternalsChanged` when jax no longer keeps them where this reads them.
    """
    try:
        from jax._src import distributed

        state = distributed.global_state
        return int(state.process_id), int(state.num_processes)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise _changed("jax._src.distributed.global_state.process_id / num_processes", e) from None


def distributed_client():
    """The coordination-service client `jax.distributed.initialize` connected (its key-value store and barriers:
    ``key_value_set``, ``blocking_key_value_get``, ``wait_at_barrier``), None before one is connected.

    Raises `JaxInternalsChanged` when jax no longer keeps it where this reads it.
    """
    try:
        from jax._src import distributed

        client = distributed.global_state.client
    except (ImportError, AttributeError) as e:
        raise _changed("jax._src.distributed.global_state.client", e) from None
    if client is not None and not all(hasattr(client, m) for m in CLIENT_METHODS):
        raise _changed("the distributed client's key-value store", AttributeError(
            f"missing {[m for m in CLIENT_METHODS if not hasattr(client, m)]}"))
    return client


CLIENT_METHODS = ("key_value_set", "blocking_key_value_get", "wait_at_barrier")
"""What `distributed_client` callers use of the client (checked by tests/test_compat.py)."""


class _PluginErrorAsNote:
    """A logging filter: jax's "plugin configuration error" (a GPU plugin installed for deviceless compiles on a
    machine without the CUDA runtime) becomes one line naming the cause, without its traceback."""

    def filter(self, record) -> bool:
        if not str(record.msg).startswith("Jax plugin configuration error") or not record.exc_info:
            return True
        cause = record.exc_info[1]
        record.msg = (f"{record.getMessage()}: {type(cause).__name__}: {cause} (jax uses the platforms that "
                      "did load; this machine has no runtime for that plugin)")
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_plugin_errors() -> None:
    """Report a jax plugin that fails to initialise in one line, not a traceback (the logger name is jax's
    xla_bridge module's, where the message is logged)."""
    import logging

    log = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _PluginErrorAsNote) for f in log.filters):
        log.addFilter(_PluginErrorAsNote())

