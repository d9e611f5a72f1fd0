"""The private jax APIs behind `moe_jax.compat`: present, and behaving as the package uses them.

A jax upgrade that moves or changes one of them fails here, naming it, instead of
silently changing behaviour (`compat.backend_started` would answer True for ever, and
`Cluster.start` would fail only in a multi-process run).
"""

import importlib
import subprocess
import sys

import jax
import pytest
from conftest import clean_env

from moe_jax import compat


@pytest.mark.parametrize("module,attribute", [(m, a) for m, attrs in compat.PRIVATE_APIS.items() for a in attrs])
def test_private_jax_api_still_exists(module, attribute):
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"jax {jax.__version__} has no module {module} ({e}): update moe_jax/compat.py")
    assert hasattr(found, attribute), (f"jax {jax.__version__}: {module}.{attribute} is gone; "
                                       "update moe_jax/compat.py")


def test_backend_started_after_the_backend_starts():
    jax.devices()                                  # conftest started it already; this makes sure
    from jax._src import xla_bridge

    assert xla_bridge.backends_are_initialized() is True
    assert compat.backend_started() is True


def test_backend_not_started_in_a_fresh_process():
    """Importing jax starts no backend, and asking does not start one; using jax does."""
    code = ("import jax\nfrom moe_jax import compat\nfrom jax._src import xla_bridge\n"
            "before = compat.backend_started()\nassert not xla_bridge.backends_are_initialized()\n"
            "jax.devices()\nprint(before, compat.backend_started())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=clean_env(JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_distributed_state_has_the_fields_read():
    from jax._src import distributed

    state = distributed.global_state
    assert isinstance(state.process_id, int) and isinstance(state.num_processes, int), (
        f"jax {jax.__version__}: jax._src.distributed.global_state changed shape; update moe_jax/compat.py")
    # a process that never joined a cluster is process 0 of 1, as jax.process_index()/process_count() say
    assert compat.distributed_process() == (0, 1) == (jax.process_index(), jax.process_count())


def test_a_moved_api_is_reported_not_misread(monkeypatch):
    from jax._src import distributed, xla_bridge

    monkeypatch.delattr(distributed, "global_state")
    with pytest.raises(compat.JaxInternalsChanged, match=f"jax {jax.__version__} no longer provides "
                                                         "jax._src.distributed.global_state"):
        compat.distributed_process()
    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert compat.backend_started() is True        # the safe answer: callers then check the device count


def test_distributed_client_has_the_methods_used():
    from jax._src import distributed
    from jax._src.lib import _jax

    assert compat.distributed_client() is None     # no cluster joined in this process
    assert hasattr(distributed.global_state, "client")
    missing = [m for m in compat.CLIENT_METHODS if not hasattr(_jax.DistributedRuntimeClient, m)]
    assert not missing, f"jax {jax.__version__}: the distributed client lost {missing}; update moe_jax/compat.py"


def test_a_plugin_that_fails_to_load_is_one_line_not_a_traceback(caplog):
    import logging

    from moe_jax.compat import quiet_plugin_errors

    quiet_plugin_errors()
    quiet_plugin_errors()                                         # idempotent: one filter
    log = logging.getLogger("jax._src.xla_bridge")
    assert len(log.filters) == 1
    try:
        raise RuntimeError("Unable to load cuDNN. Is it installed?")
    except RuntimeError:
        with caplog.at_level(logging.WARNING, logger="jax._src.xla_bridge"):
            log.exception("Jax plugin configuration error: Exception when calling %s.initialize()", "xla_cuda13")
    record = caplog.records[-1]
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert "xla_cuda13.initialize(): RuntimeError: Unable to load cuDNN" in record.getMessage()
