"""Compile a Triton kernel for sm_90 (H100, H200) on any machine and read what it uses.

No GPU is needed: Triton compiles to a cubin with the ptxas it ships, and disassembles it with the cuobjdump it
ships. The chapters' scripts use this to check, before a GPU call, what a kernel will use there: registers,
spilled bytes, shared memory, which tensor-core instructions and copies the compiler chose, and the instructions
of its main loop. Import it in a process where TRITON_INTERPRET is not set: an interpreted kernel cannot be
compiled.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def compile_sm90(jit, signature: dict[str, str], constants: dict, *, num_warps: int, num_stages: int,
                 aligned: tuple[str, ...] = ()):
    """``jit`` (a @triton.jit function) compiled for sm_90. ``signature`` maps every non-constant argument to its
    Triton type ("*bf16", "i32", ...); ``constants`` gives the constexpr arguments. Pointers, and the integer
    arguments named in ``aligned``, are marked 16-byte divisible, as Triton marks torch's tensors and sizes."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {name: "constexpr" if name in constants else signature[name] for name in jit.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names)
             if sig[name].startswith("*") or name in aligned}
    src = triton.compiler.ASTSource(fn=jit, signature=sig, attrs=attrs,
                                    constexprs={(jit.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def cuobjdump(compiled, *flags: str) -> str:
    """cuobjdump's output on the compiled kernel's cubin (``--dump-resource-usage``, ``-sass``, ...)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def registers_and_spills(compiled) -> tuple[int, int]:
    """Registers per thread, and bytes of stack per thread (spills), as ptxas allocated them."""
    usage = cuobjdump(compiled, "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))
