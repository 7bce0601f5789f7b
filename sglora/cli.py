"""``sglora`` command line: pipeline stages, generation, evaluation and the service."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from app.logs import FORMATS, LEVELS
from sglora import __version__
from sglora.devices import check_device_name, error_line, out_of_memory, resolve_device
from sglora.methods import (
    EQUAL_WEIGHT_METHODS,
    EVALUATION_METHODS,
    EVERY_EXPERT_METHODS,
    GENERATIVE_METHODS,
    SAMPLING_METHODS,
)
from sglora.text import clean_description

EXIT_USAGE = 2
OUT_SUFFIXES = (".safetensors", ".zip")


def _device(name: str) -> str:
    return resolve_device(name, "--device")


def _device_arg(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def _add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", type=_device_arg, default="auto", help="auto, cpu, cuda or cuda:N")


def port_number(text: str) -> int:
    """argparse type of a TCP port: 0 (any free one) to 65535."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {port}")
    return port


def seconds(text: str) -> float:
    """argparse type of a duration: a finite number of seconds >= 0 (NaN passed float() and failed at shutdown)."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def cmd_pipeline(args: argparse.Namespace) -> int:
    from sglora.artifacts import STAGES
    from training.config import load_config
    from training.pipeline import run_pipeline

    if not args.out.strip():  # an unset $OUT in a script: the artefacts landed in the working directory
        raise ValueError("--out is empty; give an artefact directory (a new one, or one to resume)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found before the config and the data load
        raise ValueError(f"--out {out} is a file; give an artefact directory (a new one, or one to resume)")
    cfg = load_config(args.config)
    stages = tuple(s for s in STAGES if s in args.stage) if args.stage else STAGES  # in pipeline order, as given or not
    # A full run keeps a generator trained from the same inputs; a stage named is run regardless.
    run_pipeline(cfg, out, stages, device=_device(args.device), keep_unchanged=not args.stage)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from models.backbone import describe_backbone
    from training.config import load_config

    if args.config and args.config_flag and args.config != args.config_flag:
        raise ValueError(f"two configs given ({args.config} and --config {args.config_flag}): give one")
    if not (path := args.config or args.config_flag):
        raise ValueError("give a config: sglora check-config CONFIG (or --config CONFIG, as for sglora pipeline)")
    cfg = load_config(path)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"backbone: {describe_backbone(cfg.backbone)}", file=sys.stderr)
    if args.data:  # the dataset too: its files, the split and each task's samples, as the experts stage checks them
        from models.backbone import create_backbone
        from training.pipeline import check_descriptions, prepare_data, warn_long_captions

        dataset, splits = prepare_data(cfg)
        backbone = create_backbone(cfg.backbone)  # its tokenizer counts the texts' tokens
        check_descriptions(backbone, dataset, splits.all())
        warn_long_captions(backbone, dataset, splits.all())
        read = dataset.check_images(splits.all())  # a file cut short is found now, not after tasks have trained
        roles = ", ".join(f"{role} {len(getattr(splits, role))}" for role in ("experts", "train", "val", "test"))
        size = f"{len(dataset.tasks)} tasks, {len(dataset.samples)} samples" + (f", {read} image files read" if read else "")
        print(f"data: {size}; split: {roles}; fingerprint {dataset.fingerprint()}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sglora.io import read_json
    from training.config import PipelineConfig, from_dict
    from training.pipeline import pipeline_lock, stage_evaluate

    root = Path(args.artifacts)
    if not root.is_dir():
        raise ValueError(f"artefact directory not found: {root}")
    cfg = from_dict(PipelineConfig, read_json(root / "config.json", "pipeline config"))
    with pipeline_lock(root):
        stage_evaluate(cfg, root, _device(args.device), tuple(args.method) if args.method else None, on=args.on)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sglora.artifacts import load_artifacts
    from sglora.io import atomic_path, output_path_problem

    description = clean_description(args.description)  # refused before the artefacts load
    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: give a FILE.safetensors or a FILE.zip (a zipped PEFT adapter folder)")
    if problem := output_path_problem(out, "--out"):  # before the work; a failed write named the temporary file
        raise ValueError(problem)
    # A LoRA written over an artefact (a pinned file, an expert) left the directory refused by every command.
    root = Path(os.path.realpath(args.artifacts))
    if root in Path(os.path.realpath(out)).parents:
        raise ValueError(f"--out {out} is inside the artefact directory {args.artifacts}: write the LoRA elsewhere")
    unused = [
        flag
        for flag, value, used in (
            ("--seed", args.seed, args.method in SAMPLING_METHODS),
            ("--top-k", args.top_k, args.method not in EVERY_EXPERT_METHODS),
            ("--temperature", args.temperature, args.method not in EQUAL_WEIGHT_METHODS),
        )
        if value is not None and not used
    ]
    if unused:
        print(
            f"sglora generate: warning: {' and '.join(unused)} {'does' if len(unused) == 1 else 'do'} nothing for {args.method}",
            file=sys.stderr,
        )
    a = load_artifacts(args.artifacts, _device(args.device), require_generator=args.method in SAMPLING_METHODS)
    data, g = a.lora_file(
        description,
        args.method,
        seed=args.seed,
        top_k=args.top_k,
        temperature=args.temperature,
        zipped=out.suffix.lower() == ".zip",
    )
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
    except OSError as e:  # named by the file asked for, not the temporary one beside it
        raise OSError(f"--out {out}: cannot write it ({e.strerror or e})") from e
    chosen = ", ".join(f"{e.name} ({e.weight:.2f})" for e in g.experts[:8])
    shown = os.fsdecode(out).encode("utf-8", "backslashreplace").decode()  # a non-UTF-8 name printed, not a crash
    seed = "" if g.seed is None else f" seed={g.seed}"  # the deterministic methods draw nothing
    print(f"wrote {shown} ({len(data)} bytes) method={g.method}{seed} experts: {chosen}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from sglora.artifacts import load_artifacts

    description = clean_description(args.description)
    a = load_artifacts(args.artifacts, "cpu", require_generator=False)
    a.check_description_length(description)
    g = a.engine.generate(a.engine.embed([description])[0], "topk-weighted", top_k=args.top_k, temperature=args.temperature)
    print(f"top-{g.top_k} experts for {description!r} (temperature {g.temperature}):")
    for e in g.experts:
        print(f"  {e.weight:6.3f}  sim {e.similarity:+.3f}  {e.name}: {a.repository[e.name].description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.serve import main as serve_main

    argv = ["--artifacts", str(args.artifacts)] if args.artifacts else []  # else app.serve reads $SGLORA_ARTIFACTS
    argv += ["--host", args.host, "--port", str(args.port)]
    argv += ["--graceful-timeout", str(args.graceful_timeout)]
    if args.device is not None:  # an explicit --device auto overrides $SGLORA_DEVICE too
        argv += ["--device", args.device]
    if args.log_format:
        argv += ["--log-format", args.log_format]
    argv += ["--log-level", args.log_level]
    if args.no_access_log:
        argv += ["--no-access-log"]
    if args.root_path:  # checked by app.serve's parser
        argv += ["--root-path", args.root_path]
    if args.workers is not None:  # checked by app.serve's parser
        argv += ["--workers", args.workers]
    return serve_main(argv, prog="sglora serve")  # exits 0 after a graceful SIGTERM (uvicorn.run would re-raise it)


class _Parser(argparse.ArgumentParser):
    _args: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        # argparse reads a lone word starting with '-' ("-red") as an unknown option, and then finds the
        # description missing: say how to pass it, when such a word was given
        unknown = self._unknown_dashed()
        if "required: description" in message and unknown:
            message += f"; a description that starts with '-' goes last, after '--' (e.g. ... -- {unknown[0]})"
        super().error(message)

    def _unknown_dashed(self) -> list[str]:
        """The words given that start with '-' and are neither an option (abbreviations included), an
        option's value, nor a negative number (argparse takes those as positionals)."""
        words, value_next = [], False
        for word in self._args:
            if value_next:
                value_next = False
                continue
            if word == "--":
                break
            name = word.split("=", 1)[0]
            known = [o for o in self._option_string_actions if o == name or (name.startswith("--") and o.startswith(name))]
            if len(known) == 1 or name in known:
                action = self._option_string_actions[name if name in known else known[0]]
                value_next = "=" not in word and action.nargs != 0
            elif word.startswith("-") and not self._negative_number_matcher.match(word):
                words.append(word)
        return words


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglora", description="Semantic-guided LoRA parameter generation.")
    p.add_argument("--version", action="version", version=f"sglora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("pipeline", help="train experts, build the repository, train the generator, evaluate")
    s.add_argument("--config", required=True, help="YAML config (see configs/)")
    s.add_argument("--out", required=True, help="artefact directory")
    s.add_argument(
        "--stage",
        action="append",
        choices=["experts", "repository", "generator", "evaluate"],
        help="run only this stage (repeatable)",
    )
    _add_device(s)
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("check-config", help="load and validate a config, print it resolved")
    s.add_argument("config", nargs="?", help="YAML config (see configs/)")
    s.add_argument("--config", dest="config_flag", metavar="CONFIG", help="the same, as `sglora pipeline` takes it")
    s.add_argument(
        "--data",
        action="store_true",
        help="also load the dataset and check the split, every task's samples and the descriptions' length "
        "(which builds the backbone, its pretrained weights included)",
    )
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("evaluate", help="evaluate every method on the unseen tasks of an artefact directory")
    s.add_argument("--artifacts", required=True)
    s.add_argument("--method", action="append", choices=EVALUATION_METHODS, help="only this method (repeatable)")
    s.add_argument("--on", choices=["test", "val"], default="test", help="unseen test tasks, or validation tasks for tuning")
    _add_device(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("generate", help="generate a LoRA for a task description")
    s.add_argument("description", help="the task in words (one starting with '-' goes after '--')")
    s.add_argument("--artifacts", required=True)
    s.add_argument("--out", required=True, help="FILE.safetensors, or FILE.zip for a zipped PEFT adapter folder")
    s.add_argument(
        "--method",
        default="sg-lora",
        # zero-shot is the frozen backbone (an all-zero LoRA): a reference of the evaluation, not a file to write
        choices=[m for m in GENERATIVE_METHODS if m != "zero-shot"],
    )
    s.add_argument("--seed", type=int)
    s.add_argument("--top-k", type=int)
    s.add_argument("--temperature", type=float)
    _add_device(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("select", help="show the experts and weights a description selects")
    s.add_argument("description", help="the task in words (one starting with '-' goes after '--')")
    s.add_argument("--artifacts", required=True)
    s.add_argument("--top-k", type=int)
    s.add_argument("--temperature", type=float)
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--artifacts", help="artefact directory (default: $SGLORA_ARTIFACTS)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--device", type=_device_arg, default=None, help="auto, cpu, cuda or cuda:N (default: $SGLORA_DEVICE or auto)")
    s.add_argument("--graceful-timeout", type=seconds, default=30.0, help="seconds in-flight requests get after SIGTERM")
    s.add_argument(
        "--workers",
        default=None,
        help="server processes behind the address, one copy of the weights each (default: $SGLORA_WORKERS or 1)",
    )
    s.add_argument(
        "--log-format",
        choices=FORMATS,
        help="text, or json: one JSON object per line (default: $SGLORA_LOG_FORMAT or text)",
    )
    s.add_argument("--log-level", default="info", choices=LEVELS)
    s.add_argument("--no-access-log", action="store_true", help="no line per request (load tests)")
    s.add_argument("--root-path", default="", help="the path prefix a proxy serves the service under and strips, e.g. /sglora")
    s.set_defaults(func=cmd_serve)
    return p


LOG_PROGRESS_INTERVAL_S = "10"


def progress_for(stream) -> None:
    """Progress bars redraw in place on a terminal; written to a log file or a pipe (CI, a container's
    log) every redraw is another chunk of text, a few per second per bar. There, at most one per
    ``LOG_PROGRESS_INTERVAL_S`` (tqdm reads ``TQDM_MININTERVAL``; a value set by the user wins)."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        os.environ.setdefault("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL_S)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a scheduler's kill) raised where the program is, as Ctrl-C is: the ``finally``
    blocks of atomic writes remove their temporary files, and the run says it was stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _resume_hint(args: argparse.Namespace) -> str:
    """What a stopped pipeline keeps: its finished tasks and stages, which the same command resumes from."""
    if args.command != "pipeline":
        return ""
    from training.pipeline import PIPELINE_LOCK  # loaded already: the pipeline ran

    out = Path(args.out)
    try:
        if not out.is_dir() or not any(p.name != PIPELINE_LOCK for p in out.iterdir()):
            return ""  # a run stopped before writing: nothing kept
    except OSError:  # not listable: say nothing of it
        return ""
    return f"; the trained tasks and finished stages in {args.out} are kept: rerun the same command to resume"


_OWN = tuple(Path(__file__).resolve().parent.parent / d for d in ("sglora", "training", "models", "expert_store", "app"))
_plain_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """This project's own warnings as one line, without the source line Python prints after it (a user reads
    'warning: ...', not a line of the loader's code); other packages' keep their file and line."""
    if category is UserWarning and any(Path(filename).resolve().is_relative_to(d) for d in _OWN):
        return f"warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: idle OpenMP threads sleep rather than spin (shared machines, servers).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.formatwarning = _format_warning
    progress_for(sys.stderr)
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    # OSError: a missing file, a directory given for a file, no permission; ImportError: an optional package
    # a config needs (the offline backbone's) is not installed
    except (ValueError, KeyError, OSError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sglora {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not out_of_memory(e):
            raise
        # Not a bug: the device (or the host) had no room for this run; say what to change, not a traceback.
        hint = ": lower the config's batch sizes (experts.batch_size, generator.batch_size, generator.task_images)" * (
            args.command == "pipeline"
        )
        print(f"sglora {args.command}: out of memory ({error_line(e)}){hint}{_resume_hint(args)}", file=sys.stderr)
        return 1
    except Terminated as e:
        if args.command == "serve":  # while app.serve loads (torch, uvicorn), before its own handlers: as after
            print(f"{e.args[0]} during start-up: stopped", file=sys.stderr)
            return 0
        print(f"stopped by {e.args[0]}{_resume_hint(args)}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if args.command == "serve":  # Ctrl-C in the same window: as python -m app and a later start-up do
            print("SIGINT during start-up: stopped", file=sys.stderr)
            return 0
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    finally:
        # None: a handler set outside Python, which cannot be put back; the default then. Not where the command
        # set its own meanwhile (a graceful `serve` ignores a second SIGTERM while the process exits).
        if main_thread and signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def entry() -> None:
    """The ``sglora`` command: :func:`main`, then its status. A Ctrl-C while the interpreter shuts down (a
    second with torch loaded) killed a finished run by SIGINT, with no message, its work committed and
    reported: once main has returned, SIGINT is ignored."""
    status = main()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    entry()
