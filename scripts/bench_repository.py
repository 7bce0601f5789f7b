"""How the service's costs grow with the number of experts, in one run.

    python scripts/bench_repository.py --artifacts artifacts/offline-default --experts 1000 --work /tmp/bench-repo

Copies the artefact directory to ``--work`` (a new path; the original is never changed) and grows the
copy's repository to ``--experts`` experts with ``ExpertRepository.add_and_save``. The added experts are
synthetic: an existing expert's mean plus noise of 5 % of its spread, its variance, and its embedding plus
noise. Nothing measured depends on their values. The script then starts the service on the copy
(``python -m app`` without Redis, its default model threads, a free loopback port) and measures:

  1. start-up to /ready, and the server's resident memory then;
  2. a lone /generate miss (median of ``--requests``);
  3. POST /experts (an addition), with one client generating meanwhile (the longest of its generations:
     how long the change holds generations up), then the first two concurrent /generate after it (what
     waits for the work a change leaves behind), and the next one alone;
  4. DELETE /experts/{name} (the same expert), and the same generations;
  5. model-soup (every expert) and GET /experts: latency and size;
  6. the server's resident memory, and its peak, at the end;
  7. after the server is stopped, in this process: ``ExpertRepository.load`` of the whole repository, and a
     following server's reload after another process added one expert (``load(..., reuse=...)``: only the
     new file read).

The copy is left in ``--work`` for a look; delete it afterwards. Prints a Markdown table; ``--json``
writes the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

from app import processes
from sglora.io import output_path_problem, write_json

ADDED = "bench-added-expert"  # the expert measure 3 adds and measure 4 removes


def grow(root: Path, experts: int) -> tuple[int, float]:
    """Grows ``root``'s repository to ``experts`` experts; (experts before, seconds taken)."""
    import torch
    from tqdm import tqdm

    from expert_store.repository import Expert, ExpertRepository

    directory = root / "repository"
    repo = ExpertRepository.load(directory)
    base = [repo[n] for n in repo.names]
    before, t0 = len(base), time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for i in tqdm(range(before, experts), desc="experts", unit="expert", disable=experts <= before):
        b = base[i % before]
        mean = b.mean + 0.05 * b.mean.std() * torch.randn(b.mean.shape, generator=g)
        emb = torch.nn.functional.normalize(b.embedding + 0.05 * torch.randn(b.embedding.shape, generator=g), dim=0)
        expert = Expert(f"s{i:06d}", f"{b.description} (variant {i})", mean, b.variance.clone(), emb, b.num_snapshots)
        repo.add_and_save(expert, directory)
    return before, time.perf_counter() - t0


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory and its peak (VmRSS, VmHWM), in MB; empty where /proc is missing."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb"}
    return {fields[k]: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in lines) if k in fields}


async def measure(url: str, admin: str, requests: int) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:

        async def generate(description: str, seed: int, method: str = "sg-lora") -> tuple[httpx.Response, float]:
            t0 = time.perf_counter()
            r = await c.post("/generate", json={"description": description, "method": method, "seed": seed})
            if r.status_code != 200:
                raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
            return r, 1000 * (time.perf_counter() - t0)

        for i in range(3):  # warm-up
            await generate(f"a photo for warming up, number {i}", i)
        lone = [(await generate(f"a photo of a sandal on a shelf, number {i}", i))[1] for i in range(requests)]
        out["lone_miss_ms"] = statistics.median(lone)
        t0 = time.perf_counter()
        listing = await c.get("/experts")
        out["list_experts_ms"], out["list_experts_bytes"] = 1000 * (time.perf_counter() - t0), len(listing.content)
        soup, out["model_soup_ms"] = await generate("a photo of anything", 0, "model-soup")
        out["model_soup_header_bytes"] = sum(len(k) + len(v) + 4 for k, v in soup.headers.items())
        first = listing.json()["experts"][0]["name"]
        mean = (await c.get(f"/experts/{first}")).content
        variance = (await c.get(f"/experts/{first}", params={"part": "variance"})).content
        keys = {"X-API-Key": admin}
        changes = {
            "add": lambda: c.post(
                "/experts",
                headers=keys,
                data={"name": ADDED, "description": "a photo of a sunflower field", "num_snapshots": "1"},
                files={"mean": ("mean.safetensors", mean), "variance": ("variance.safetensors", variance)},
            ),
            "remove": lambda: c.delete(f"/experts/{ADDED}", headers=keys),
        }
        for label, change in changes.items():
            done, during = asyncio.Event(), []

            # one client generating while the change runs
            async def beside(label: str, done: asyncio.Event, during: list[float]) -> None:
                k = 0
                while not done.is_set():
                    during.append((await generate(f"while the {label} runs, {k}", k))[1])
                    k += 1

            t0 = time.perf_counter()
            client = asyncio.create_task(beside(label, done, during))
            try:
                r = await change()
            finally:
                out[f"{label}_ms"] = 1000 * (time.perf_counter() - t0)
                done.set()
                await client
            out[f"longest_during_{label}_ms"], out[f"generations_during_{label}"] = max(during), len(during)
            if r.status_code not in (200, 201):
                raise RuntimeError(f"{label} answered {r.status_code}: {r.text[:300]}")
            both = await asyncio.gather(*(generate(f"the first after the {label}, {k}", k) for k in (1, 2)))
            out[f"first_two_after_{label}_ms"] = [ms for _, ms in both]
            out[f"next_after_{label}_ms"] = (await generate(f"the next after the {label}", 3))[1]
    return out


def reloads(root: Path) -> dict[str, float]:
    """Seconds to load the repository whole, and to load it again after one expert was added elsewhere."""
    import torch

    from expert_store.repository import Expert, ExpertRepository

    directory = root / "repository"
    t0 = time.perf_counter()
    served = ExpertRepository.load(directory)
    whole = time.perf_counter() - t0
    # Another process, which adds an expert (a whole load of its own: one reusing ``served`` would take its
    # stack's spare rows over, and the reload timed below would then have to stack anew)
    other = ExpertRepository.load(directory)
    b = served[served.names[0]]
    emb = torch.nn.functional.normalize(b.embedding + 0.05 * torch.randn(b.embedding.shape), dim=0)
    other.add_and_save(Expert(ADDED, "a photo of a sunflower field", b.mean + 0.01, b.variance.clone(), emb, 1), directory)
    t0 = time.perf_counter()
    followed = ExpertRepository.load(directory, reuse=served)
    follow = time.perf_counter() - t0
    if followed.names[-1] != ADDED or len(followed) != len(served) + 1:
        raise RuntimeError("the reload after an addition did not hold the added expert")
    other.remove_and_save(ADDED, directory)
    return {"load_whole_s": whole, "reload_after_add_s": follow}


def run(args: argparse.Namespace) -> dict:
    shutil.copytree(args.artifacts, args.work)
    before, grow_s = grow(args.work, args.experts)
    admin = secrets.token_urlsafe(16)
    env = {**os.environ, "SGLORA_ARTIFACTS": str(args.work), "SGLORA_REDIS_URL": "", "SGLORA_ADMIN_KEYS": admin}
    env["SGLORA_DEVICE"] = args.device
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = processes.start_server(port, env, "--log-level", "warning")
    try:
        ready = processes.wait_ready(url, proc, timeout=1800)
        result = {"startup_s": time.perf_counter() - t0, **{f"ready_{k}": v for k, v in memory_mb(proc.pid).items()}}
        result |= asyncio.run(measure(url, admin, args.requests))
        result |= {f"end_{k}": v for k, v in memory_mb(proc.pid).items()}
    finally:
        processes.stop(proc)
    result |= reloads(args.work)
    return {
        "artifacts": str(args.artifacts),
        "work": str(args.work),
        "experts": ready["experts"],
        "experts_before": before,
        "grow_s": grow_s,
        "device": args.device,
        "model_threads": ready.get("model_threads"),
        **result,
    }


def table(r: dict) -> str:
    def ms(v: float) -> str:
        return f"{v:.1f} ms"

    rows = [
        ("start-up to /ready", f"{r['startup_s']:.1f} s"),
        ("resident memory when ready / at the end (peak)", _memory(r)),
        ("lone /generate miss, median", ms(r["lone_miss_ms"])),
        ("POST /experts (an addition)", ms(r["add_ms"])),
        ("the longest /generate while it ran (of one client's)", _during(r, "add")),
        ("the first two concurrent /generate after it; the next", _after(r, "add")),
        ("DELETE /experts/{name}", ms(r["remove_ms"])),
        ("the longest /generate while it ran (of one client's)", _during(r, "remove")),
        ("the first two concurrent /generate after it; the next", _after(r, "remove")),
        ("model-soup /generate; its headers", f"{ms(r['model_soup_ms'])}; {r['model_soup_header_bytes']} bytes"),
        ("GET /experts", f"{ms(r['list_experts_ms'])}; {r['list_experts_bytes']} bytes"),
        ("ExpertRepository.load, whole (in process)", f"{r['load_whole_s']:.2f} s"),
        ("a following server's reload after one expert added elsewhere", f"{r['reload_after_add_s']:.2f} s"),
    ]
    grown = (
        f"grown from {r['experts_before']} to {r['experts']} experts ({r['grow_s']:.1f} s)"
        if r["experts"] > r["experts_before"]
        else f"of {r['experts']} experts (--experts asked for no more)"
    )
    head = (
        f"Artefacts `{r['artifacts']}`, a copy {grown} in `{r['work']}`, {r['device']}, "
        f"{r['model_threads']} model thread(s), no Redis\n\n"
    )
    return head + "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def _memory(r: dict) -> str:
    if "ready_rss_mb" not in r:
        return "n/a (no /proc)"
    return f"{r['ready_rss_mb']:.0f} MB / {r['end_rss_mb']:.0f} MB ({r['end_peak_rss_mb']:.0f} MB)"


def _during(r: dict, label: str) -> str:
    return f"{r[f'longest_during_{label}_ms']:.1f} ms (of {r[f'generations_during_{label}']})"


def _after(r: dict, label: str) -> str:
    first = ", ".join(f"{v:.1f}" for v in r[f"first_two_after_{label}_ms"])
    return f"{first} ms; {r[f'next_after_{label}_ms']:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the API image, for the server started here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--experts", type=int, required=True, help="experts to grow the copy's repository to")
    p.add_argument("--work", type=Path, required=True, help="a new directory for the copy (left there)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=15, help="lone misses timed")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    args.artifacts, args.work = args.artifacts.resolve(), args.work.resolve()  # the server runs in the repository root
    if args.experts < 1 or args.requests < 1:
        p.error("--experts and --requests must be >= 1")
    if args.work.exists():
        p.error(f"--work {args.work} exists; give a new path")
    if args.json and (problem := output_path_problem(args.json, "--json")) is not None:
        p.error(problem)
    if not (args.artifacts / "manifest.json").is_file():
        raise SystemExit(f"bench_repository: {args.artifacts} holds no artefacts (no manifest.json)")
    try:
        result = run(args)
    except (RuntimeError, httpx.HTTPError) as e:  # the server did not start, refused or dropped a request
        raise SystemExit(f"bench_repository: {e} (the copy is left in {args.work})") from None
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
