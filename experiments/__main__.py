"""`python -m experiments <name> [--config FILE] [--out DIR] [key=value ...]`."""

import argparse
import dataclasses
import os
import sys

from ._config import load_config, to_dict


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
    presets = sorted(getattr(module, "PRESETS", {}))
    lines += ["", f"presets: {', '.join(presets)} (configs/{name}/<preset>.toml)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # x64 is switched on by the entry point, never on import of gaugejax.
    import jax

    jax.config.update("jax_enable_x64", True)
    from gaugejax import io

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
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (TOML values)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --config

    module = EXPERIMENTS[args.name]
    # Repeat runs reuse compiled XLA programs (most of a smoke run's time is compilation);
    # benchmarks opt out, as their compile times must be measured, not read from disk.
    cache = os.environ.get(
        "GAUGEJAX_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gaugejax", "jax")
    )
    if cache and getattr(module, "PERSISTENT_COMPILE_CACHE", True):
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        config = load_config(module.Config, args.config, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    try:
        run_dir = io.make_run_dir(args.out, args.name)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot create a run directory there ({e})")
    io.write_json(run_dir / "config.json", to_dict(config))
    io.write_json(run_dir / "env.json", io.env_info())
    summary = module.run(config, run_dir)
    io.write_json(run_dir / "summary.json", summary)

    claims = summary.get("claims", [])
    for c in claims:
        print(f"[{c['verdict']:>4}] {c['id']:<28} measured {c['measured']:.3g}  ({c['tolerance']})")
    if claims:
        print(f"{summary.get('num_pass', 0)}/{len(claims)} claims pass; results in {run_dir}")
    else:  # a benchmark: numbers, no claims
        print(f"results in {run_dir}")
    if "report" in summary:
        print(f"report: {run_dir / summary['report']}")
    return 0 if all(c["verdict"] == "pass" for c in claims) else 1


if __name__ == "__main__":
    sys.exit(main())
