"""Resources of every kernel of the default AOT set (tests/helpers/aot.py: what the dispatcher
launches for real shapes), per configuration, for sm_80 and sm_90: shared memory must fit the
device (SHARED_LIMIT: 166,912 B on sm_80, 232,448 B on sm_90), else the first launch raises
OutOfResources. The configurations over the limit today are listed in aot.KNOWN_OVER_LIMIT with
their reason and run as strict xfails: a fixed one fails (XPASS) until its entry is removed.

Registers and spills are recorded (docs/triton-resources.md, written by scripts/triton_resources.py)
but do not fail: ptxas caps registers per thread at what the block size allows.
"""
import re
from pathlib import Path

import pytest
import torch

from helpers import aot
from tntkernels import _backend

DOC = Path(__file__).resolve().parents[3] / "docs" / "triton-resources.md"
# the default set is captured from launches (aot.capture_launches), which needs Triton's compiler mode:
# none under TRITON_INTERPRET=1, where the aot tests are skipped anyway
JOBS = ({family: aot.default_jobs(family) for family in aot.FAMILIES}
        if _backend.triton_importable() and not _backend.triton_interpret() else {})


def _resources(job: aot.Job) -> aot.Resources:
    """The job's resources; its whole family compiles at once (two processes), once per session."""
    return dict(zip(JOBS[job.family], aot.compile_all(list(JOBS[job.family]))))[job]


def _param(job: aot.Job):
    reason = aot.KNOWN_OVER_LIMIT.get(job.key)
    marks = [pytest.mark.xfail(strict=True, reason=f"known over the limit: {reason}")] if reason else []
    return pytest.param(job, id=job.id, marks=marks)


@pytest.mark.aot
@pytest.mark.parametrize("job", [_param(job) for jobs in JOBS.values() for job in jobs])
def test_shared_memory_within_the_device_limit(job):
    res = _resources(job)
    assert res.n_regs > 0 and res.n_spills >= 0
    assert res.shared <= aot.SHARED_LIMIT[job.arch], (
        f"{job.id}: {res.shared:,} B of shared memory > {aot.SHARED_LIMIT[job.arch]:,} B on sm_{job.arch} "
        f"(launched for {', '.join(JOBS[job.family][job])})")


def _refusal_bound_kb(job: aot.Job) -> int | None:
    """The dispatcher's bound (KB) on this job's shared memory: `shared_kb` of the nested and fused-block
    modules, whose `unsupported()` refuses a configuration over the device's limit; None for kernels
    without one (inner_attention, hsim, the fused block's forward: its bound is keyed by the backward's
    BLOCK_R)."""
    c = dict(job.constexprs)
    compute = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        job.dtype.partition("+")[2] or job.dtype]
    if job.family == "nested_attention":
        from tntkernels.ops.triton import nested_attention as mod
        return mod.shared_kb(c["BLOCK_H"], c["BLOCK_F"], c["BLOCK_D"], compute)
    if job.kernel == "_inner_block_bwd_kernel":
        from tntkernels.ops.triton import inner_block as mod
        return mod.shared_kb(c["BLOCK_C"], c["BLOCK_R"], compute)
    return None


@pytest.mark.aot
@pytest.mark.parametrize("job", [pytest.param(job, id=job.id) for jobs in JOBS.values() for job in jobs
                                 if _refusal_bound_kb(job) is not None])
def test_shared_memory_within_the_dispatchers_bound(job):
    """SHARED_KB (hand-copied from these compiles) bounds what each configuration really requests:
    an entry too low would let the dispatcher launch a kernel the device cannot hold."""
    res, bound = _resources(job), _refusal_bound_kb(job)
    assert res.shared <= bound * 1024, (
        f"{job.id}: {res.shared:,} B of shared memory > the {bound} KB its module's SHARED_KB allows for; "
        f"raise the entry")


def test_known_over_limit_names_default_jobs():
    """Every KNOWN_OVER_LIMIT entry is a job of the default set (a renamed configuration does not
    leave a stale entry behind), with a reason."""
    default = {job.key for jobs in JOBS.values() for job in jobs}
    for key, reason in aot.KNOWN_OVER_LIMIT.items():
        assert key in default, f"KNOWN_OVER_LIMIT entry {key} is not in the default AOT set"
        assert reason.strip(), key


def _doc_rows() -> dict[tuple, tuple[int, bool]]:
    """(kernel, config, dtype, arch) -> (shared bytes, over limit) of the table in docs/triton-resources.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not cells[0].startswith("`_"):
            continue
        kernel, config, dtype, arch, shared, _, _, over = cells[:8]
        rows[(kernel.strip("`"), config.strip("`"), dtype, int(arch.removeprefix("sm_")))] = (
            int(shared.replace(",", "")), over.startswith("**yes"))
    return rows


@pytest.mark.aot
def test_docs_table_is_current():
    """docs/triton-resources.md lists exactly the default set, with the shared memory and the
    over-limit verdict of this compilation (regenerate: python scripts/triton_resources.py)."""
    assert DOC.exists(), "docs/triton-resources.md is missing: python scripts/triton_resources.py"
    rows = _doc_rows()
    expected = {}
    for family, jobs in JOBS.items():
        merged = aot.by_config(zip(jobs, aot.compile_all(list(jobs))))
        for (_, kernel, config, dtype, arch), res in merged.items():
            expected[(kernel, config, dtype, arch)] = (res.shared, res.shared > aot.SHARED_LIMIT[arch])
    stale = "docs/triton-resources.md is stale: python scripts/triton_resources.py"
    assert set(rows) == set(expected), f"{stale} (rows differ: {sorted(set(rows) ^ set(expected))[:5]})"
    import triton
    same_triton = re.search(rf"triton {re.escape(triton.__version__)}\b", DOC.read_text()) is not None
    for key, (shared, over) in expected.items():
        assert rows[key][1] == over, f"{stale} ({key}: over limit {over})"
        if same_triton:
            assert rows[key][0] == shared, f"{stale} ({key}: shared {shared} B, table {rows[key][0]} B)"
