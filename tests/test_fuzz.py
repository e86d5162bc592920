"""Fuzzing every op: random shapes (zero-sized ones included), dtypes, strides and bad values, from a
fixed seed. Each case must either raise a clear "moestream.<op>: ..." error or return what the
reference returns; the fake (meta) kernel must agree with the CPU kernel (same error, or the same
shapes, dtypes and strides), except that checks of values (ids, offsets) need the data.

The cases run in a child process (this file run as a script) that reports each case before running
it, so a crash (a signal) is caught, recorded against the case and the child restarted after it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

SEED = 20261201
NUM_CASES = 900
# messages of the checks that read values: the fake kernels cannot make them
DATA_CHECKS = ("must lie in [0", "must be in [0", "offsets do not add up")


# ---------------------------------------------------------------------------------------------- cases


def _cases_module():
    import torch

    FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    OTHER = [torch.int32, torch.int64, torch.bool, torch.int8]

    class Gen:
        def __init__(self, seed: int) -> None:
            self.r = random.Random(seed)
            self.g = torch.Generator().manual_seed(seed)

        def dim(self, lo: int = 0, hi: int = 9) -> int:
            return self.r.choice([lo, lo, hi, *range(lo, hi + 1)])

        def floats(self, *shape, dtype=None):
            dtype = dtype or self.r.choice(FLOATS)
            return self.strided(torch.randn(shape, generator=self.g).to(dtype))

        def strided(self, t):
            """t's values with other strides, a third of the time (transposed or sliced storage)."""
            if t.dim() < 1 or self.r.random() > 0.35:
                return t
            if t.dim() >= 2 and self.r.random() < 0.5:
                return t.transpose(-1, -2).contiguous().transpose(-1, -2)
            big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
            big[..., 1::2] = t
            return big[..., 1::2]

        def ids(self, T, k, E, dtype=None):
            dtype = dtype or self.r.choice([torch.int32, torch.int64])
            return self.strided(torch.randint(0, max(E, 1), (T, k), generator=self.g).to(dtype))

        def offsets(self, E, M):
            ends = sorted(self.r.randint(0, M) for _ in range(E))
            if ends and self.r.random() < 0.5:
                ends[-1] = M
            return torch.tensor(ends, dtype=self.r.choice([torch.int32, torch.int64]))

    def valid(name: str, q: Gen) -> list:
        """A valid call of op `name` with random sizes, dtypes and strides."""
        r = q.r
        T, E = q.dim(0, 9), q.dim(1, 8)
        k = r.randint(1, E)
        if name in ("router_topk", "router_topk_backward"):
            groups = r.choice([g for g in range(1, E + 1) if E % g == 0])
            topk_groups = r.randint(1, groups)
            k = r.randint(1, topk_groups * (E // groups))
            logits = q.floats(T, E)
            score, topk_first = r.choice(["softmax", "sigmoid"]), r.random() < 0.3
            if topk_first:
                groups = topk_groups = 1
            bias = q.floats(E) if r.random() < 0.3 and not topk_first else None
            normalize, scale = r.random() < 0.5, r.choice([1.0, 2.5])
            if name == "router_topk":
                return [logits, k, score, topk_first, bias, groups, topk_groups, normalize, scale]
            ids = torch.ops.moestream.router_topk(
                logits, k, score, topk_first, bias, groups, topk_groups, normalize, scale
            )[1]
            return [q.floats(T, k), logits, ids, score, topk_first, normalize, scale]
        if name in ("router_aux_loss", "router_aux_loss_backward"):
            mask = None
            if r.random() < 0.4:
                mask = torch.randint(0, 2, (T,), generator=q.g).to(
                    r.choice([torch.float32, torch.bool, torch.int64])
                )
            args = [q.floats(T, E), q.ids(T, k, E), mask]
            return args if name == "router_aux_loss" else [q.floats(), *args]
        if name == "router_z_loss":
            return [q.floats(T, E)]
        if name == "router_z_loss_backward":
            return [q.floats(), q.floats(T, E)]
        H = q.dim(0, 17)
        if name == "permute":
            return [q.floats(T, H), q.ids(T, k, E), E]
        if name in ("unpermute", "unpermute_backward"):
            dtype = r.choice(FLOATS)
            _, perm, _ = torch.ops.moestream.permute(torch.zeros(T, 1), q.ids(T, k, E), E)
            if r.random() < 0.3:
                perm = perm.to(torch.int32)
            w = q.floats(T, k) if r.random() < 0.6 else None
            ys = q.floats(T * k, H, dtype=dtype)
            if name == "unpermute":
                return [ys, q.strided(perm), w]
            return [q.floats(T, H, dtype=dtype), ys, perm, w, r.random() < 0.7]
        M, K, N = q.dim(0, 12), q.dim(0, 9), q.dim(0, 9)
        dtype = r.choice(FLOATS)
        offsets = q.offsets(E, M)
        tb = r.random() < 0.5
        if name == "grouped_mm":
            b = q.floats(E, N, K, dtype=dtype) if tb else q.floats(E, K, N, dtype=dtype)
            return [q.floats(M, K, dtype=dtype), b, offsets, tb, q.floats(E, N) if r.random() < 0.3 else None]
        if name == "grouped_mm_weight_grad":
            return [q.floats(M, K, dtype=dtype), q.floats(M, N, dtype=dtype), offsets, tb]
        if name == "grouped_bias_grad":
            return [q.floats(M, N), offsets]
        I = q.dim(0, 6)
        kind, layout = r.choice(["swiglu", "geglu", "gptoss"]), r.choice(["concat", "interleaved"])
        lead = [q.dim(0, 5) for _ in range(r.randint(0, 2))]
        if name == "gated_activation":
            return [q.floats(*lead, 2 * I), kind, layout, r.choice([1.702, 0.5]), r.choice([7.0, 0.3])]
        if name == "gated_activation_backward":
            return [q.floats(*lead, I), q.floats(*lead, 2 * I), kind, layout, 1.702, r.choice([7.0, 0.3])]
        assert name == "moe_experts"
        w1 = q.floats(E, 2 * I, H, dtype=dtype) if tb else q.floats(E, H, 2 * I, dtype=dtype)
        w2 = q.floats(E, H, I, dtype=dtype) if tb else q.floats(E, I, H, dtype=dtype)
        b1 = q.floats(E, 2 * I) if r.random() < 0.3 else None
        b2 = q.floats(E, H) if r.random() < 0.3 else None
        x = q.floats(T, H, dtype=dtype)
        return [x, q.ids(T, k, E), q.floats(T, k), w1, w2, b1, b2, kind, layout, tb, 1.702, 7.0]

    def mutate(args: list, q: Gen) -> str:
        """One random bad change to `args`, in place; returns what it did."""
        r = q.r
        j = r.randrange(len(args))
        a = args[j]
        if isinstance(a, torch.Tensor):
            how = r.choice(["dtype", "size", "dims", "values", "meta", "scalar"])
            if how == "dtype":
                args[j] = a.to(r.choice(FLOATS + OTHER))
            elif how == "size" and a.dim():
                d = r.randrange(a.dim())
                shape = list(a.shape)
                shape[d] = r.choice([0, shape[d] + 1, max(shape[d] - 1, 0), 2 * shape[d] + 3])
                args[j] = (
                    torch.zeros(shape, dtype=a.dtype)
                    if not a.dtype.is_floating_point
                    else torch.randn(shape, generator=q.g).to(a.dtype)
                )
            elif how == "dims":
                args[j] = (
                    a.unsqueeze(r.randint(0, a.dim())) if r.random() < 0.5 or a.dim() == 0 else a.flatten()
                )
            elif how == "values" and a.numel():
                b = a.clone()
                flat = b.view(-1) if b.is_contiguous() else None
                if flat is None:
                    b = b.contiguous()
                    flat = b.view(-1)
                i = r.randrange(flat.numel())
                if a.dtype.is_floating_point:
                    flat[i] = r.choice([float("nan"), float("inf"), -float("inf"), 1e30])
                elif a.dtype != torch.bool:
                    flat[i] = r.choice([-1, 2**20, 1 << 30]) if a.dtype != torch.int8 else -1
                args[j] = b
            elif how == "meta":
                args[j] = a.to("meta")
            else:
                args[j] = a.reshape(-1)[0].clone() if a.numel() else torch.zeros(())
            return f"arg {j}: {how}"
        if a is None:
            args[j] = torch.randn(3, generator=q.g)
            return f"arg {j}: None -> tensor"
        if isinstance(a, bool):
            args[j] = not a
            return f"arg {j}: flipped"
        if isinstance(a, int):
            args[j] = r.choice([0, -1, a + 1, 2 * a + 7, 2**31])
            return f"arg {j}: int {a} -> {args[j]}"
        if isinstance(a, float):
            args[j] = r.choice([float("nan"), float("inf"), -1.0, 0.0])
            return f"arg {j}: float {a} -> {args[j]}"
        if isinstance(a, str):
            args[j] = r.choice(["", "bogus", a.upper()])
            return f"arg {j}: str {a!r} -> {args[j]!r}"
        return "nothing"

    def case(i: int):
        from moestream import ops as msops

        q = Gen(SEED * 1000 + i)
        name = msops.OP_NAMES[i % len(msops.OP_NAMES)]
        args = valid(name, q)
        what = mutate(args, q) if q.r.random() < 0.6 else "valid"
        return name, args, what

    return case


# ---------------------------------------------------------------------------------------------- one case


def _describe(args) -> str:
    import torch

    def one(a):
        if isinstance(a, torch.Tensor):
            return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}{'' if a.is_contiguous() else ' strided'}{' meta' if a.is_meta else ''}"
        return repr(a)

    return ", ".join(one(a) for a in args)


def _outcome(fn):

    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the exception type is part of what is checked
        return {"error": type(e).__name__, "msg": str(e).split("\n")[0]}, None
    outs = out if isinstance(out, tuple) else (out,)
    return {"outputs": [[list(t.shape), str(t.dtype), list(t.stride())] for t in outs]}, outs


def _rel(out, ref) -> float:
    import torch

    out, ref = out.double(), ref.double()
    if out.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    both_nan = torch.isnan(out) & torch.isnan(ref)
    if torch.isnan(out).ne(torch.isnan(ref)).any():
        return float("inf")
    same = both_nan | (out == ref)  # equal infinities too (the z-loss of zero experts is inf)
    out, ref = out.masked_fill(same, 0), ref.masked_fill(same, 0)
    return (
        float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        if ref.norm() > 1e-12
        else float((out - ref).norm())
    )


def _check_values(name, args, outs) -> str | None:
    """Compares a forward op's outputs with the reference (float64 inputs); None when they agree."""
    import torch
    from moestream import reference

    if not hasattr(reference, name):
        return None  # the backward ops: gradcheck in their own tests
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.is_meta for t in tensors) or any(
        t.dtype.is_floating_point and not torch.isfinite(t).all() for t in tensors
    ):
        return None
    # the least precise input sets the tolerance
    eps = max((torch.finfo(t.dtype).eps for t in tensors if t.dtype.is_floating_point), default=0.0)
    tol = 1e-9 if eps < 1e-10 else 2e-5 if eps < 1e-6 else 4e-2
    ref = getattr(reference, name)(
        *[a.double() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a for a in args]
    )
    refs = ref if isinstance(ref, tuple) else (ref,)
    for n, (o, rr) in enumerate(zip(outs, refs)):
        if name == "router_topk" and n == 1:
            # near-ties may order ids differently; the weights (compared above) carry the selection
            if o.numel() and (o.min() < 0 or o.max() >= args[0].shape[1]):
                return f"ids out of range: {o}"
            continue
        if not o.dtype.is_floating_point:
            if not torch.equal(o, rr):
                return f"output {n} differs from the reference"
            continue
        err = _rel(o, rr)
        if not err <= tol:
            return f"output {n}: relative error {err:.3g} > {tol:g}"
    return None


def run_case(i: int, case) -> dict:
    import torch

    name, args, what = case(i)
    op = getattr(torch.ops.moestream, name)
    res = {"case": i, "op": name, "what": what, "args": _describe(args)}
    cpu, outs = _outcome(lambda: op(*args))
    # with a meta tensor among the arguments "cpu" is itself the fake kernel: mixed devices must fail
    mixed = len({a.is_meta for a in args if isinstance(a, torch.Tensor)}) == 2
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    meta, _ = _outcome(lambda: op(*meta_args))
    problems = []
    if mixed and "same device" not in cpu.get("msg", ""):
        problems.append(f"a meta tensor next to CPU ones gives {cpu}")
    if "error" in cpu:
        if cpu["error"] not in ("RuntimeError", "ValueError") or not cpu["msg"].startswith(
            f"moestream.{name}: "
        ):
            problems.append(f"unclear error {cpu['error']}: {cpu['msg']}")
        data_check = any(s in cpu["msg"] for s in DATA_CHECKS)
        if not mixed and meta != cpu and not (data_check and "outputs" in meta):
            problems.append(f"meta gives {meta}, the CPU kernel {cpu}")
    else:
        if meta != cpu:
            problems.append(f"meta gives {meta}, the CPU kernel {cpu}")
        bad = _check_values(name, args, outs)
        if bad:
            problems.append(bad)
    res["problems"] = problems
    res["ran"] = "outputs" in cpu
    return res


# ---------------------------------------------------------------------------------------------- driver


def _child(start: int, end: int, progress: str) -> None:
    import moestream  # noqa: F401 - registers the ops
    import torch

    torch.set_num_threads(1)
    case = _cases_module()
    with open(progress, "a") as f:
        for i in range(start, end):
            f.write(json.dumps({"start": i}) + "\n")
            f.flush()
            f.write(json.dumps(run_case(i, case)) + "\n")
            f.flush()


def run_all(num_cases: int, progress: str) -> list[dict]:
    """Runs cases [0, num_cases) in child processes; a case that kills its child is reported as a crash."""
    results: dict[int, dict] = {}
    start = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while start < num_cases:
        proc = subprocess.run(
            [sys.executable, __file__, str(start), str(num_cases), progress],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        last = None
        with open(progress) as f:
            for line in f:
                rec = json.loads(line)
                if "start" in rec:
                    last = rec["start"]
                else:
                    results[rec["case"]] = rec
        if proc.returncode == 0:
            break
        if last is None or last in results:
            raise RuntimeError(
                f"the fuzz child failed outside a case (rc {proc.returncode}): {proc.stderr[-2000:]}"
            )
        results[last] = {"case": last, "problems": [f"crashed (rc {proc.returncode}): {proc.stderr[-500:]}"]}
        start = last + 1
    return [results[i] for i in sorted(results)]


def test_fuzz_every_op(tmp_path):
    results = run_all(NUM_CASES, str(tmp_path / "progress.jsonl"))
    assert len(results) == NUM_CASES
    bad = [r for r in results if r["problems"]]
    report = "\n".join(
        f"case {r['case']} {r.get('op')} ({r.get('what')}; {r.get('args')}): {r['problems']}"
        for r in bad[:20]
    )
    assert not bad, f"{len(bad)} of {NUM_CASES} cases failed:\n{report}"
    # the cases exercise both sides: valid calls checked against the reference, and refusals
    ran = sum(r.get("ran", False) for r in results)
    assert NUM_CASES // 4 < ran < NUM_CASES - NUM_CASES // 4, ran


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
