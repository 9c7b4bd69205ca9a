"""raybatch's vLLM general plugin: every process vLLM starts may use AMX tiles.

Without the permission, vLLM's bfloat16 CPU attention dies of SIGILL in an embedding
model's worker at its first row (tests/integration/test_embeddings.py on AMX hosts)."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from raybatch.engines.vllm_plugin import request_amx

# In a fresh process, as vLLM's spawned worker starts: load vLLM's general plugins,
# then read the process's extended-state permissions (arch_prctl ARCH_GET_XCOMP_PERM).
_PERMISSION_AFTER_PLUGINS = """
import ctypes
import sys

if sys.argv[1] == "plugins":
    from vllm.plugins import load_general_plugins
    load_general_plugins()
libc = ctypes.CDLL(None, use_errno=True)
features = ctypes.c_ulong(0)
assert libc.syscall(158, 0x1022, ctypes.byref(features)) == 0  # SYS_arch_prctl, ARCH_GET_XCOMP_PERM
print(bool(features.value & (1 << 18)))  # XFEATURE_XTILEDATA: the AMX tiles
"""


def test_the_plugin_is_registered_for_vllm():
    plugins = {entry.name: entry for entry in entry_points(group="vllm.general_plugins")}
    assert plugins["request_amx"].load() is request_amx


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles")
def test_a_new_process_may_use_amx_once_vllm_loads_its_plugins():
    def amx_permitted(*argv: str) -> bool:
        out = subprocess.run([sys.executable, "-c", _PERMISSION_AFTER_PLUGINS, *argv],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1] == "True"

    assert not amx_permitted("none"), "a new process has no AMX permission of its own"
    assert amx_permitted("plugins")
