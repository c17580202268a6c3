"""benchmarks/walk_ptx.py: PTX statistics of the walk, on a hand-written kernel text."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import walk_ptx  # noqa: E402

PTX = """
.visible .entry body_mosaic_gpu_kernel(
\t.param .u64 body_param_0
)
{
\t.reg .b32 \t%r<9>;
\t.reg .pred \t%p<3>;
$L__BB0_1:
\tld.shared.f32 \t%f1, [%r1];  // a load
\t{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1,%r2}, %rd1, %rd2, p, 1, 1, 0, 0; }
\twgmma.fence.sync.aligned;
\t@%p1 bra \t$L__BB0_1;
\t@!%p2 st.local.f32 \t[%r2], %f1;
\tbar.sync \t1, 128;
\tshfl.sync.bfly.b32 \t%r3, %r2, 1, 31, -1;
\tcvt.rn.bf16x2.f32 \t%r4, %f1, %f2;
\tselp.f32 \t%f3, %f1, %f2, %p1;
\tex2.approx.ftz.f32 \t%f4, %f3;
\tret;
}
"""

PTXAS = """ptxas warning : Registers are spilled to local memory in function 'body', 704 bytes spill stores, 1072 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 648 bytes cumulative stack size
"""


def test_every_instruction_of_the_kernel_is_counted_once():
    assert walk_ptx.opcodes(PTX) == [
        "ld.shared.f32", "setp.ne.b32", "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
        "wgmma.fence.sync.aligned", "bra", "st.local.f32", "bar.sync", "shfl.sync.bfly.b32",
        "cvt.rn.bf16x2.f32", "selp.f32", "ex2.approx.ftz.f32", "ret",
    ]  # fmt: skip
    stats = walk_ptx.ptx_stats(PTX, PTXAS)
    assert stats == walk_ptx.PtxStats(
        instructions=12, wgmma=1, barriers=1, shuffles=1, exp2=1, conversions=1, selects=1,
        loads_stores=2, registers=255, spill_bytes=704,
    )  # fmt: skip


def test_a_kernel_without_spills_reports_none():
    stats = walk_ptx.ptx_stats("\tret;\n", "ptxas info    : Used 44 registers, used 2 barriers\n")
    assert (stats.instructions, stats.registers, stats.spill_bytes) == (1, 44, 0)
