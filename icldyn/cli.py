"""The `icldyn` command: a thin layer that parses flags and calls one library function.

    icldyn train   --config STUDY.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]
                   [--grid FIELD=V1,V2,... ...] [--quiet] [--overwrite]
    icldyn analyze --workdir DIR [--measures M,...] [--curve EVALUATOR/METRIC ...]
    icldyn patch   --workdir DIR [--corruption NAME] [--senders ...] [--receivers ...] [--inputs q,k,v]
    icldyn densify --workdir DIR [--window auto|START:END] [--num N]
    icldyn plot    --workdir DIR [--pdf] [--runs R1,R2] [--steps S1,S2] [--time-axis auto|log|linear]
    icldyn demo    [--workdir DIR]           train + analyze + plot the default demo
    icldyn toy     --config toy[:smoke] --workdir DIR
    icldyn list                              the bundled studies and their variants
    icldyn paper   --outdir DIR [--variant cpu|smoke]   every study + analysis + plots

Bad input ends with one line `icldyn: error: FIELD: message` and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from icldyn.errors import ConfigError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume)
EXIT_IO = 74  # EX_IOERR: the workdir could not be written (disk full, ...); fix, then resume

DEMO_STUDY = "demo"  # icldyn/studies/demo.py


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.FIELD=VALUE` (or `--config.FIELD VALUE`) from other args."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(body, "override needs a value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _train_epilog() -> str:
  """The config fields, for `icldyn train --help` (imports the config, so only then)."""
  from icldyn import config as config_lib
  cfg = config_lib.base_config()
  fields = [f for f in config_lib.all_fields(cfg) if f != "grid"]
  return ("config overrides (repeatable, any field; type-checked):\n"
          "  --config.FIELD=VALUE  e.g. --config.train.learning_rate=1e-4 "
          "--config.model.num_heads=4\n\n"
          "grid axes: --grid FIELD=V1,V2 (product), --grid F1+F2=A1/B1,A2/B2 (zipped)\n\n"
          "fields (README 'Config fields'; task.name selects the task, whose group is read):\n  "
          + "\n  ".join(f"{f} = {config_lib.get_field(cfg, f)!r}" for f in fields))


def _analyze_epilog() -> str:
  """Measures and the curve grammar, for `icldyn analyze --help`."""
  from icldyn.analysis import measures as measures_lib
  return ("measures (--measures M1,M2 or 'all'; default: every one but 'clamped'):\n  "
          + ", ".join(measures_lib.MEASURES) + "\n\n"
          "curves (--curve, repeatable; default: the task's, e.g. fsl_train/loss and\n"
          "fsl_train/induction_strength):\n"
          "  EVALUATOR/METRIC[:up|down[:LEVEL[:CLIP]]]   a metrics.csv curve (a metric name\n"
          "      also times its per-head children: induction_strength = .h0, .h1, ...)\n"
          "  progress/MEASURE[...]                       a progress.csv measure\n"
          "  down: first crossing below LEVEL (loss default 0.4 ln 2, clipped at ln 2);\n"
          "  up: above LEVEL (acc 0.8, others 0.5); CLIP: a number or 'none'")


def _parser(epilogs: bool = False) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="icldyn", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  raw = argparse.RawDescriptionHelpFormatter

  t = sub.add_parser("train", help="train a grid of runs into a workdir", formatter_class=raw,
                     epilog=_train_epilog() if epilogs else None,
                     usage="icldyn train --config STUDY[:VARIANT] --workdir DIR "
                           "[--config.FIELD=VALUE ...] [--grid FIELD=V1,V2 ...] [--quiet] "
                           "[--overwrite]")
  t.add_argument("--config", required=True,
                 help="a bundled study (`icldyn list`), e.g. ih_paper:smoke, or a study file "
                      "PATH.py[:VARIANT] of your own")
  t.add_argument("--workdir", required=True,
                 help="output directory (created; the same command resumes it)")
  t.add_argument("--grid", action="append", default=[],
                 help="FIELD=V1,V2,... (repeat for a product); replaces the study's grid")
  t.add_argument("--quiet", action="store_true", help="no progress lines")
  t.add_argument("--overwrite", action="store_true",
                 help="replace a workdir that holds a different config")
  t.add_argument("--local-processes", type=int, default=0, metavar="N",
                 help="start N processes of one grid on this host (jax.distributed; for "
                      "testing the multi-process path; README 'Several processes and hosts')")

  a = sub.add_parser("analyze", help="progress measures and phase-change timing of a workdir",
                     formatter_class=raw, epilog=_analyze_epilog() if epilogs else None)
  a.add_argument("--workdir", required=True, help="a workdir written by icldyn train")
  a.add_argument("--measures", default=None,
                 help="comma-separated measures (default: every one but 'clamped'; below), "
                      "and your own as module:function")
  a.add_argument("--curve", action="append", default=[],
                 help="EVALUATOR/METRIC[:up|down[:LEVEL[:CLIP]]] to time (grammar below)")
  a.add_argument("--quiet", action="store_true")

  pa = sub.add_parser("patch", help="path patching at every checkpoint, edge timing, circuit "
                      "scores (analysis/patching.csv, circuit.csv)")
  pa.add_argument("--workdir", required=True, help="a workdir written by icldyn train")
  pa.add_argument("--corruption", default=None,
                  help="the task's corrupted input (few-shot: permute_labels, query_class; "
                       "tokens: break_copies, resample; default: the first)")
  pa.add_argument("--senders", default=None, metavar="L0H3,L1H*", help="default: every head")
  pa.add_argument("--receivers", default=None, metavar="L1H*", help="default: every head")
  pa.add_argument("--inputs", default="q,k,v", help="receiver inputs (default q,k,v)")
  pa.add_argument("--circuit", default=None, metavar="L0H3->L1H5.k,L1H5->logits",
                  help="the circuit's edges (default: edges whose final effect is at least "
                       "--threshold of the largest)")
  pa.add_argument("--threshold", type=float, default=0.2)
  pa.add_argument("--size", type=int, default=128, help="sequences per run (default 128)")
  pa.add_argument("--direction", default="noising", choices=["noising", "denoising"])
  pa.add_argument("--ablation", default="mean", choices=["mean", "zero"])
  pa.add_argument("--scores", default="edges", choices=["edges", "heads", "both", "none"],
                  help="circuit scores: of its edges, path-level ablation (default), of its "
                       "heads, head knockouts, both, or none")
  pa.add_argument("--no-scores", action="store_true", help="the same as --scores none")
  pa.add_argument("--samples", type=int, default=8,
                  help="sampled subsets per completeness and minimality score (default 8)")
  pa.add_argument("--unclamped", action="store_true",
                  help="patch without the runs' training clamps (default: with them, the "
                       "model that was trained)")
  pa.add_argument("--block", type=int, default=4, help="checkpoints per call (default 4)")
  pa.add_argument("--chunk", type=int, default=None,
                  help="runs side by side (default: 8 on a CPU, all on an accelerator; 0: all)")
  pa.add_argument("--batch-size", type=int, default=None,
                  help="interventions side by side inside a run: senders, scored sets "
                       "(default: all). Memory grows with chunk x batch size x --size x "
                       "sequence length^2: e.g. --size 64 --chunk 2 --batch-size 8 for the "
                       "token task")
  pa.add_argument("--quiet", action="store_true")

  dn = sub.add_parser("densify", help="re-run around each transition, saving dense checkpoints")
  dn.add_argument("--workdir", required=True)
  dn.add_argument("--window", default="auto", help="'auto' or START:END in sequences")
  dn.add_argument("--num", type=int, default=32, help="dense checkpoints per window")
  dn.add_argument("--curve", default=None,
                  help="curve whose transitions 'auto' finds (default: the task's headline curve)")
  dn.add_argument("--quiet", action="store_true")

  pl = sub.add_parser("plot", help="figures and report.md of a workdir")
  pl.add_argument("--workdir", required=True)
  pl.add_argument("--pdf", action="store_true", help="also write PDF figures")
  pl.add_argument("--time-axis", default="auto", choices=["auto", "log", "linear"],
                  help="training-time axis of every figure (auto: log when the evaluations "
                       "span more than two decades)")
  pl.add_argument("--runs", default=None, metavar="R1,R2",
                  help="runs whose attention patterns to draw (default: run 0)")
  pl.add_argument("--steps", default=None, metavar="S1,S2",
                  help="checkpoints (training sequences) of the attention patterns (default: "
                       "first, nearest the phase change, last)")

  d = sub.add_parser("demo", help="train, analyse and plot the default demo")
  d.add_argument("--workdir", default="runs/demo")
  d.add_argument("--quiet", action="store_true")

  pp = sub.add_parser("paper", help="every study of the paper, with analysis and plots")
  pp.add_argument("--outdir", default="runs/paper")
  pp.add_argument("--variant", default="", choices=["", "cpu", "smoke"], metavar="{cpu,smoke}",
                  help="the studies' variant; omitted: the paper's settings (hours)")
  pp.add_argument("--smoke", action="store_true", help="same as --variant smoke")
  pp.add_argument("--quiet", action="store_true")

  ty = sub.add_parser("toy", help="the toy model of phase changes (Singh et al. 2024, Fig. 5a)")
  ty.add_argument("--config", default="toy", help="the toy study (default: toy; toy:smoke)")

  sub.add_parser("list", help="the bundled studies, their variants and one line each")
  ty.add_argument("--workdir", required=True)
  return p


def _setup_logging(quiet: bool) -> None:
  logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                      format="[icldyn] %(message)s", stream=sys.stderr)
  for noisy in ("absl", "orbax", "jax", "etils", "matplotlib"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  try:
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
  except ImportError:
    pass


def cmd_train(args, overrides: list[str]) -> int:
  from icldyn import distributed
  if args.local_processes:
    return distributed.launch_local(sys.argv[1:], args.local_processes)
  distributed.initialize()  # before anything starts JAX's back end
  from icldyn import config as config_lib
  from icldyn import runner, studies
  cfg = studies.load(args.config)
  config_lib.apply_overrides(cfg, overrides)
  try:
    summary = runner.train(cfg, args.workdir, args.grid, quiet=args.quiet, overwrite=args.overwrite)
  except runner.Preempted as e:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):  # started as `python -m icldyn`
      argv[:1] = [sys.executable, "-m", "icldyn"]
    cmd = " ".join(shlex.quote(a) for a in argv)
    print(f"icldyn: {e}; resume with: {cmd}", file=sys.stderr)
    return EXIT_PREEMPTED
  except runner.WorkdirError as e:
    print(f"icldyn: error: {e}", file=sys.stderr)
    return EXIT_IO
  except distributed.PeerLost as e:
    print(f"icldyn: error: {e}; the workdir is resumable: start every process again with the "
          "same command", file=sys.stderr, flush=True)
    # Not sys.exit: JAX's shutdown at exit would wait for the lost process, then abort.
    os._exit(distributed.EXIT_PEER_LOST)
  except Exception as e:
    if isinstance(e, ConfigError) or distributed.process_count() == 1:
      raise  # every process raises the same ConfigError: all end together
    # One process failing alone: end it at once, so the others' next exchange
    # fails (PeerLost, exit 75) instead of all waiting on JAX's shutdown barrier.
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
  n_div = len(summary["diverged"])
  print(f"icldyn: trained {summary['num_runs']} run(s) in {summary['seconds']:.0f}s; "
        f"{n_div} diverged{' ' + str(summary['diverged']) if n_div else ''}; "
        f"results in {summary['workdir']}", file=sys.stderr)
  return EXIT_DIVERGED if n_div else 0


def cmd_analyze(args) -> int:
  from icldyn.analysis import command
  command.analyze(args.workdir, measures=args.measures, curves=args.curve or None,
                  quiet=args.quiet)
  return 0


def cmd_patch(args) -> int:
  from icldyn.patching import command
  if args.size < 1:
    raise ConfigError("--size", f"must be at least 1, got {args.size}")
  command.patch(args.workdir, args.corruption, args.senders, args.receivers, args.inputs,
                circuit=args.circuit, threshold=args.threshold, size=args.size,
                direction=args.direction, ablation=args.ablation,
                scores="none" if args.no_scores else args.scores, clamped=not args.unclamped,
                num_samples=args.samples, block=args.block, chunk=args.chunk,
                batch_size=args.batch_size, quiet=args.quiet)
  return 0


def _int_list(text: str | None, flag: str) -> list[int] | None:
  """'1,2,3' as [1, 2, 3] (None stays None); ConfigError naming the flag otherwise."""
  if text is None:
    return None
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(flag, f"expected comma-separated integers, got {text!r}") from None


def cmd_plot(args) -> int:
  from icldyn import pipeline, plots, report
  from icldyn.store import files
  if not os.path.isdir(args.workdir):
    raise ConfigError("--workdir", f"no such directory {args.workdir}")
  for name in (files.CONFIG_JSON, files.RUNS_CSV):
    if not os.path.isfile(os.path.join(args.workdir, name)):  # refuse before writing anything
      raise ConfigError("--workdir", f"{args.workdir} has no {name}; is it an icldyn train "
                        "workdir?")
  pipeline.attention_patterns(args.workdir, _int_list(args.runs, "--runs"),
                              _int_list(args.steps, "--steps"))
  paths = plots.make_all(args.workdir, pdf=args.pdf, time_axis=args.time_axis)
  rep = report.write_report(args.workdir)
  print(f"icldyn: wrote {len(paths)} figure(s) under {os.path.join(args.workdir, 'plots')} "
        f"and {rep}", file=sys.stderr)
  return 0


def cmd_demo(args) -> int:
  from icldyn import pipeline, runner, studies
  cfg = studies.load(DEMO_STUDY)
  try:
    summary = pipeline.run_study(cfg, args.workdir, quiet=args.quiet)
  except runner.Preempted as e:
    print(f"icldyn: {e}; run `make demo` again to resume", file=sys.stderr)
    return EXIT_PREEMPTED
  paths, rep = summary["figures"], summary["report"]
  print(f"\nicldyn demo: {summary['num_runs']} runs trained in {summary['seconds']:.0f}s.\n"
        f"  metrics:       {os.path.join(args.workdir, 'metrics.csv')}\n"
        f"  checkpoints:   {os.path.join(args.workdir, 'checkpoints')}\n"
        f"  TensorBoard:   tensorboard --logdir {os.path.join(args.workdir, 'tb')}\n"
        f"  phase changes: {os.path.join(args.workdir, 'analysis', 'phase_changes.csv')}\n"
        f"  figures:       {os.path.join(args.workdir, 'plots')} ({len(paths)} files)\n"
        f"  report:        {rep}", file=sys.stderr)
  return 0


def cmd_toy(args) -> int:
  from icldyn import studies, toy
  cfg = studies.load(args.config)
  try:
    toy_cfg = toy.ToyConfig.from_mapping(cfg.toy)
  except ValueError as e:
    raise ConfigError("toy", str(e)) from e
  summary = toy.run_toy_study(args.workdir, toy_cfg, list(cfg.init_seeds),
                              clamps=tuple(cfg.clamps), level=cfg.level)
  for cond, s in summary.items():
    print(f"{cond:>10}: transition median {s.get('median')} over {s.get('n_seeds')} seeds",
          file=sys.stderr)
  return 0


def _enable_compilation_cache() -> None:
  """Caches compiled programs on disk: a resumed or repeated grid skips compiling.

  Location: $ICLDYN_COMPILATION_CACHE, default ~/.cache/icldyn/xla; set it to
  an empty string to disable.
  """
  path = os.environ.get("ICLDYN_COMPILATION_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "icldyn", "xla"))
  if not path:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `icldyn` console script."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    wants_help = bool(rest) and rest[0] in ("train", "analyze") and any(
        a in ("-h", "--help") for a in rest)
    args = _parser(epilogs=wants_help).parse_args(rest)
    _setup_logging(getattr(args, "quiet", False))
    if args.command in ("train", "demo", "paper", "analyze", "densify", "patch"):
      _enable_compilation_cache()
    if overrides and args.command != "train":
      raise ConfigError(overrides[0].split("=")[0], "--config.FIELD overrides apply to train only")
    if args.command == "train":
      return cmd_train(args, overrides)
    if args.command == "analyze":
      return cmd_analyze(args)
    if args.command == "patch":
      return cmd_patch(args)
    if args.command == "plot":
      return cmd_plot(args)
    if args.command == "list":
      from icldyn import studies
      print(studies.describe())
      return 0
    if args.command == "densify":
      from icldyn.analysis import densify
      try:
        out = densify.densify(args.workdir, args.window, args.num, args.curve, args.quiet)
      except densify.NotReproduced as e:
        print(f"icldyn: densify: the re-run did not reproduce the stored results ({e}); "
              "nothing was written", file=sys.stderr)
        return 1
      print(f"icldyn: densify saved {out['saved']} checkpoint(s) in {out['seconds']:.0f}s",
            file=sys.stderr)
      return 0
    if args.command == "demo":
      return cmd_demo(args)
    if args.command == "toy":
      return cmd_toy(args)
    if args.command == "paper":
      from icldyn import paper
      times = paper.run_paper(args.outdir, "smoke" if args.smoke else args.variant, args.quiet)
      for study, sec in times.items():
        print(f"icldyn paper: {study:>16} {sec:7.0f}s -> {os.path.join(args.outdir, study)}",
              file=sys.stderr)
      return 0
  except ConfigError as e:
    print(f"icldyn: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


# Commands that split the CPU into one device per core (training, where it
# pays: docs/performance.md). The analysing commands keep one device.
MULTI_DEVICE_COMMANDS = ("train",)


def entry() -> None:
  """The console script: for `train`, one XLA CPU device per core
  (`sharding.configure_cpu_devices`); then `main`."""
  from icldyn import sharding
  try:
    if len(sys.argv) > 1 and sys.argv[1] in MULTI_DEVICE_COMMANDS:
      sharding.configure_cpu_devices()
  except ValueError as e:
    print(f"icldyn: error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  sys.exit(main())


if __name__ == "__main__":
  entry()
