"""raybatch's vLLM general plugin (pyproject.toml, entry point group
`vllm.general_plugins`): vLLM runs it in every process it starts, the engine core and
each model worker, before the model loads."""

from __future__ import annotations


def request_amx() -> None:
    """Ask Linux for this process's permission to use AMX tiles (ARCH_REQ_XCOMP_PERM).

    vLLM's CPU attention kernel uses AMX for bfloat16 wherever the CPU has it, but it
    never asks for the permission, and without it the first AMX instruction kills the
    process (SIGILL). A generating model happens to get the permission from oneDNN
    before its first attention; an embedding model does not: on Sapphire Rapids hosts
    its worker died at the first row, every time. The permission does not survive the
    `exec` of vLLM's spawned workers, so the replica cannot ask for them: each process
    asks for itself, here."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
