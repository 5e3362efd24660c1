"""`python -m experiments <name> [--config FILE] [--out DIR] [key=value ...]`, or
`python -m experiments <name> --resume RUN_DIR` to continue a killed run."""

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from ._config import presets


# the run directory's lock (`gj.io.run_lock`): one process runs in a directory at a time
RUN_LOCK = "run.lock"


def _listing(experiments: dict) -> str:
    lines = ["python -m experiments NAME [--config FILE] [--out DIR] [key=value ...]", ""]
    lines += ["experiments (NAME --help lists its config keys and checks):"]
    for name, module in experiments.items():
        doc = (module.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<20} {doc[0] if doc else ''}")
    return "\n".join(lines)


def _experiment_help(name: str, module) -> str:
    lines = [f"python -m experiments {name} [--config FILE] [--out DIR] [key=value ...]", ""]
    doc = (module.__doc__ or "").strip().splitlines()
    if doc:
        lines += [doc[0], ""]
    lines.append("config keys (embedded defaults):")
    for f in dataclasses.fields(module.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}")
    checks = [c for c, _ in getattr(module, "CHECKS", [])]
    if checks:
        lines += ["", f"checks (select with 'checks=[...]'): {', '.join(checks)}"]
    lines += ["", f"presets: {', '.join(presets(name))} (configs/{name}/<preset>.toml)"]
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # x64 is switched on by the entry point, never on import of gaugejax.
    import jax

    jax.config.update("jax_enable_x64", True)
    from gaugejax import (
        RunLocked,
        configure_cpu_devices,
        intra_op_threads,
        io,
        load_config,
        make_config,
        pool_threads_for,
        use_compilation_cache,
        use_fast_compile,
        use_tracing_gc,
    )

    from . import EXPERIMENTS

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(_listing(EXPERIMENTS))
        return 0
    if argv[0] in EXPERIMENTS and ("-h" in argv or "--help" in argv):
        print(_experiment_help(argv[0], EXPERIMENTS[argv[0]]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment to run")
    parser.add_argument("--config", help="TOML preset (default: the embedded default config)")
    parser.add_argument("--out", default="runs", help="root of run directories (default: runs)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR with its own config.json (finished checks are kept)",
    )
    parser.add_argument(
        "--cpu-devices",
        metavar="N",
        help="expose N CPU devices (or 'auto': one per core) that sweeps shard over (default: "
        "the experiment's own, 'auto' for benchmark_sweep; else those XLA_FLAGS gives, one "
        "unless set); reproduce already runs its experiments in parallel processes, which "
        "share the cores",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (TOML values)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --config
    # an experiment may ask for its own default (benchmark_sweep: one CPU device per core, as
    # its sharded side is measured faster so: W1 1.64x, W2 1.12x on 2 cores)
    n = args.cpu_devices or getattr(EXPERIMENTS[args.name], "CPU_DEVICES", None)
    if n is None:
        # the devices XLA_FLAGS gives (one by default), on a thread pool where several batched
        # LAPACK kernels can wait at once without a deadlock (gj.configure_cpu_devices); read
        # when the CPU client starts, at the first JAX operation (none has run yet in a fresh
        # process)
        os.environ.setdefault("NPROC", str(max(intra_op_threads(), pool_threads_for(1))))
    elif n != "auto" and not (n.isdigit() and int(n) > 0):
        parser.error(f"--cpu-devices: expected a positive int or 'auto'; received {n!r}")
    else:
        try:  # before any JAX operation
            configure_cpu_devices(None if n == "auto" else int(n))
        except RuntimeError as e:
            parser.error(f"--cpu-devices {n}: {e}")

    module = EXPERIMENTS[args.name]
    # every experiment traces many programs: its imports frozen, garbage collected less often
    use_tracing_gc()
    # an experiment that compiles many programs and runs each briefly (the check suites) asks
    # for compile time over run time; before any JAX operation, so XLA's flags apply too
    if getattr(module, "FAST_COMPILE", False):
        use_fast_compile()
    # Repeat runs reuse compiled XLA programs, however short their compile (most of a smoke
    # run's time is compilation); benchmarks opt out, as their compile times must be measured.
    cache = os.environ.get(
        "GAUGEJAX_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gaugejax", "jax")
    )
    if cache and getattr(module, "PERSISTENT_COMPILE_CACHE", True):
        use_compilation_cache(cache)
    if args.resume is not None:
        if args.config is not None or args.overrides:
            parser.error(
                f"--resume {args.resume} runs with the run's own config.json; drop --config and "
                "the key=value overrides"
            )
        run_dir = Path(args.resume)
        try:
            config = make_config(module.Config, io.read_json(run_dir / "config.json"))
        except (OSError, ValueError) as e:
            parser.error(f"--resume {run_dir}: no readable config.json of {args.name} ({e})")
    else:
        try:
            config = load_config(
                module.Config, args.config, args.overrides, source=f"--config {args.config}"
            )
        except ValueError as e:
            parser.error(str(e))
        try:
            run_dir = io.make_run_dir(args.out, args.name)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot create a run directory there ({e})")
    with contextlib.ExitStack() as held:
        # before anything is written: a second process (a --resume of a running run) is
        # refused at once, naming the holder, and leaves the holder's files untouched; the
        # kernel releases the lock when this process exits, also when it is killed
        try:
            held.enter_context(io.run_lock(run_dir / RUN_LOCK))
        except RunLocked as e:
            parser.error(f"{'--resume ' + str(run_dir) if args.resume else run_dir}: {e}")
        if args.resume is None:
            io.write_json(run_dir / "config.json", dataclasses.asdict(config))
        return _run(args, module, config, run_dir)


def _run(args, module, config, run_dir: Path) -> int:
    """Run `module` in `run_dir` (its lock held): `env.json`, `status.json`, the run, its
    `summary.json` and claims printed; the CLI's exit code."""
    from gaugejax import TrainingDiverged, format_claim, io

    env = io.env_info()
    if args.resume is not None and (run_dir / "env.json").exists():
        # each part of a resumed run keeps its record (date, commit, versions, devices)
        earlier = io.read_json(run_dir / "env.json")
        env["earlier_parts"] = [*earlier.pop("earlier_parts", []), earlier]
    io.write_json(run_dir / "env.json", env)
    status = run_dir / "status.json"

    def set_status(value: str, **extra) -> None:
        try:
            io.write_json(status, {"experiment": args.name, "status": value, **extra})
        except OSError as e:  # e.g. a full disk: say so; the run does not read as complete
            print(f"could not record status {value!r} in {status} ({e}); the run is not "
                  f"complete: resume it with --resume {run_dir}", file=sys.stderr)  # fmt: skip

    set_status("running")
    # SIGTERM (a scheduler, `kill`) stops a run as Ctrl-C does: finished work kept, resumable
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        summary = module.run(config, run_dir)
    except KeyboardInterrupt:
        set_status("interrupted")
        print(
            f"interrupted; finished work is kept in {run_dir}. Resume with: python -m experiments "
            f"{args.name} --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    except TrainingDiverged as e:  # stopped cleanly: the last good checkpoint is kept
        set_status("diverged", step=int(e.step))
        print(f"{e}\nThe run stopped in {run_dir}; nothing after step {e.step} was written.",
              file=sys.stderr)  # fmt: skip
        return 3
    except BaseException:
        set_status("failed")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    io.write_json(run_dir / "summary.json", summary)
    set_status("complete")

    claims = summary.get("claims", [])
    for c in claims:  # measured: a number, or "nan"/"inf" as JSON keeps them
        print(format_claim(c))
    if claims:
        missed = sum(c["verdict"] == "missed" for c in claims)
        aims = f" ({missed} of them aims missed, not failures)" if missed else ""
        print(f"{summary.get('num_pass', 0)}/{len(claims)} claims pass{aims}; results in {run_dir}")
    else:  # a benchmark: numbers, no claims
        print(f"results in {run_dir}")
    if "report" in summary:
        print(f"report: {run_dir / summary['report']}")
    return 0 if all(c["verdict"] != "FAIL" for c in claims) else 1


if __name__ == "__main__":
    code = main()
    if code == 130:  # interrupted: exit now, not after the checks still running in worker
        # threads (the interpreter would join them); what finished is on disk, atomically
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
