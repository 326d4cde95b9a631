"""What several commands share: their common flags, reading NAME=VALUE options, and printing clusters. Only commands
(and ``python -m laic.distributed.check``) import this module; the library never does."""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import pathlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def file_stamp(path: pathlib.Path) -> Optional[Tuple[int, int]]:
    """(inode, modification time) of ``path``, None if absent: laic writes files by renaming a new one into place,
    so a stamp that changed means the file was written since it was taken."""
    try:
        stat = path.stat()
    except OSError:   # absent, or a path through a file (the checks after name it)
        return None
    return stat.st_ino, stat.st_mtime_ns


def int_at_least(low: int):
    """An argparse ``type``: an int of at least ``low`` (argparse then names the flag: "argument --workers: must be
    at least 0, got -1"; the library's own check would name its keyword, num_workers)."""
    def integer(text: str) -> int:
        value = int(text)   # a ValueError: argparse's "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return integer


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed torch's generator takes whole (laic.runtime.MAX_SEED), checked before anything is loaded or written
    (beyond it `laic vocab --seed` failed inside torch with "Overflow when unpacking long long"; -1 was taken as
    2**64 - 1)."""
    from ..runtime import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{flag} must be between 0 and {MAX_SEED}, got {seed}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:1, ... (default auto: cuda when available, else cpu)")


def threads_for_the_run(asked: Optional[int]) -> int:
    """The CPU thread count of a fit: ``asked`` (--threads), else the count LAIC would choose from the machine's
    load (laic.runtime.default_threads), chosen here once so that run.json records the count used (it said None,
    and the count changes predict_proba's last digits)."""
    from ..runtime import default_threads

    return asked if asked is not None else default_threads()


def add_threads_argument(parser: argparse.ArgumentParser, default: Optional[int] = None) -> None:
    what = "the cores other processes leave free" if default is None else str(default)
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"CPU threads for torch (default: {what}; 1 is often faster for small inputs). "
                             "The count splits float sums: pass it where results must repeat on a machine whose "
                             "load varies (a label in a thousand may differ between 1 and 2 threads)")


# LAIC's method switches that `laic fit` has a flag for: flag -> LAIC keyword. This table alone maps them (the flags,
# `--set`'s refusal of these names, and the options a run records all come from it).
METHOD_FLAGS = {"--neighbour-filter": "neighbour_filter", "--relation-view": "relation_view",
                "--relation-fused": "relation_fused", "--semantic-centres": "semantic_centres",
                "--pseudo-labels": "pseudo_labels"}
# Switches a process group (torchrun) cannot run (laic.refine): refused before the run's first line.
ONE_PROCESS_ONLY = ("semantic_centres", "pseudo_labels")


def laic_defaults() -> Dict:
    """LAIC's keyword defaults, read from its signature (so that what a run records as set away from them cannot
    drift from them)."""
    from ..model import LAIC

    return {name: p.default for name, p in inspect.signature(LAIC).parameters.items()
            if p.default is not inspect.Parameter.empty}


RELATION_FUSED_WORDS = {"auto": "auto", "on": True, "off": False}


def relation_fused_value(word: str):
    """--relation-fused's word as LAIC's relation_fused value."""
    if word not in RELATION_FUSED_WORDS:
        raise argparse.ArgumentTypeError(f"choose auto, on or off, not {word!r}")
    return RELATION_FUSED_WORDS[word]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The METHOD_FLAGS. Those with a value default to None, LAIC's own default (:func:`method_options`): the parser
    reads no LAIC signature, which loads torch (2 to 3 s before `laic fit --help`, or a mistyped flag's error)."""
    from ..switches import NEIGHBOUR_FILTERS, PSEUDO_LABELS

    group = parser.add_argument_group("method switches (LAIC options of the same names, with LAIC's defaults)")
    group.add_argument("--neighbour-filter", choices=NEIGHBOUR_FILTERS,
                       help="which kNN graph keeps the image-space neighbours that stage 1 pulls together: text "
                            "(the default): the text counterparts'; relation: the relation features' "
                            "(laic.relations); none: every neighbour is kept")
    group.add_argument("--relation-view", action="store_true",
                       help="stage 1's second head sees the relation features (laic.relations) instead of the text "
                            "counterparts (off by default; no effect where stage 1 is not trained: below 8 "
                            "images a cluster by default, --set min_cluster_size)")
    group.add_argument("--relation-fused", type=relation_fused_value,
                       metavar="{auto,on,off}",
                       help="what the fused space (the fused k-means, and the model when stage 1 is not kept) "
                            "holds for the images: auto (the default) moves it from the centred image features "
                            "towards the relation features (laic.relations) as far as the nouns' partition follows "
                            "the images'; on: the relation features; off: the centred image features")
    group.add_argument("--semantic-centres", action="store_true",
                       help="after the partition, learn adaptive semantic centres and assign each image to the "
                            "nearest (the clusters are then named by the nouns nearest them): with --images, prompts "
                            "through the frozen text tower of --model (laic.prompt_centres); with --features, "
                            "continuous centres in the text embedding space (laic.semantic_centres). One process "
                            "only, not under torchrun (off by default)")
    group.add_argument("--pseudo-labels", choices=PSEUDO_LABELS,
                       help="kmeans (the default): the partition of stages 0 and 1; semantic: SIC's pseudo-labels "
                            "from image-semantic relations and its consistency learning, kept only when stage 1's "
                            "label-free test accepts them (laic.pseudo_labels). semantic runs in one process only, "
                            "not under torchrun")


def method_options(args: argparse.Namespace) -> Dict:
    """The LAIC keywords of the METHOD_FLAGS set away from LAIC's defaults (what the run records); a flag not given
    (None) is LAIC's default."""
    defaults = laic_defaults()
    chosen = {name: getattr(args, name) for name in METHOD_FLAGS.values()}
    return {name: value for name, value in chosen.items() if value is not None and value != defaults[name]}


def describe_options(options: Dict) -> str:
    """LAIC options for the line `laic fit` starts with: "" or "; options: name=value, ..."."""
    return "; options: " + ", ".join(f"{name}={value!r}" for name, value in options.items()) if options else ""


def parse_options(pairs: List[str], estimator, flag: str = "--set",
                  reserved: Optional[Dict[str, str]] = None,
                  check: Optional[Callable[[Dict], None]] = None) -> Dict:
    """``NAME=VALUE`` strings as keyword arguments of ``estimator`` (a class or dataclass); VALUE is read as a Python
    literal when it is one (50, 0.1, True, None, [1, 2]), as a float when it is one (nan, inf), and kept as a string
    otherwise. ``reserved`` maps the names that have their own flag to that flag. ``check({name: value})`` vets each
    option alone (the estimator's own checks, the others at their defaults), so that its error names the flag and
    what was typed."""
    params = inspect.signature(estimator).parameters
    if reserved is None:
        reserved = {"n_clusters": "--k", "random_state": "--seed", "device": "--device", "k_range": "--k-range",
                    "profile": "--profile", "n_threads": "--threads",
                    **{name: flag for flag, name in METHOD_FLAGS.items()}}
    example = f"{flag} {next(p for p in params if p not in reserved and p != 'self')}=..."
    # With their defaults: `--stage2 help` said only "expected NAME=VALUE" (help(...) in Python was the only list).
    known = ", ".join(f"{p}={params[p].default!r}" for p in params if p not in reserved and p != "self")
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE, e.g. {example}; {estimator.__name__}'s options "
                             f"(defaults) are: {known}")
        if name in reserved:
            raise ValueError(f"{flag} {name}: set it with its own flag ({reserved[name]})")
        if name not in params:
            raise ValueError(f"{flag} {name}: {estimator.__name__} has no option {name!r}; its options (defaults) "
                             f"are: {known}")
        options[name] = _option_value(text.strip())
        if check is not None:
            try:
                check({name: options[name]})
            except ValueError as exc:
                raise ValueError(f"{flag} {name}={text.strip()}: {exc}") from None
    return options


def _option_value(text: str):
    """A Python literal when ``text`` is one, else a float when it is one (nan, inf: then the option's own check says
    it must be finite, not "must be a number, got 'nan'"), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)
    except ValueError:
        return text


def print_clusters(clusters: Sequence[Dict], max_names: int = 5, max_rows: int = 40) -> None:
    """The clusters (as in clusters.json) as a table; with many clusters, the first ``max_rows``."""
    print(f"{'cluster':>7}  {'size':>6}  names")
    for c in clusters[:max_rows]:
        print(f"{c['cluster']:>7}  {c['size']:>6}  {', '.join(c['names'][:max_names])}")
    if len(clusters) > max_rows:
        print(f"{'...':>7}  {len(clusters) - max_rows} more in clusters.json")


def check_one_process_switches(options: Dict) -> None:
    """Under torchrun, refuse the ONE_PROCESS_ONLY switches now, before the run's first line (LAIC refuses them
    too, as its fit starts)."""
    from ..distributed import CollectiveError, current

    world_size = current().size
    refused = [flag for flag, name in METHOD_FLAGS.items() if name in ONE_PROCESS_ONLY and name in options]
    if world_size > 1 and refused:
        several = len(refused) > 1
        raise CollectiveError(f"{' and '.join(refused)} {'run' if several else 'runs'} in one process only, not "
                              f"under torchrun ({world_size} processes): run the fit as one process, or leave "
                              f"{'them at their defaults' if several else 'it at its default'}")


def run_dir_of(args: argparse.Namespace) -> pathlib.Path:
    """`laic fit`'s RUN_DIR (--out); a symbolic link to a folder elsewhere (a larger disk) is followed: the run goes
    there, beside it stage 2's checkpoint, and the link stays."""
    from .. import io

    out = pathlib.Path(args.out).expanduser()
    io.check_name_length(out, "--out")
    if not out.is_symlink():
        return out
    try:
        return out.resolve(strict=False)
    except (RuntimeError, OSError) as exc:   # a loop of links
        raise ValueError(f"--out {out}: a symbolic link that leads nowhere ({exc}); pass another RUN_DIR") from None


def fit_settings(args: argparse.Namespace) -> Tuple[Dict, pathlib.Path, str]:
    """`laic fit`'s LAIC options (--set and the METHOD_FLAGS), RUN_DIR and device, checked before anything long
    starts."""
    from ..model import LAIC
    from ..run_dir import check_out_dir
    from ..runtime import checked_threads, fitting_device

    options = {**method_options(args), **parse_options(args.options, LAIC,
                                                       check=lambda option: LAIC(**option)._check_settings())}
    LAIC(**options)._check_settings()   # together too, before the run's first line (each was checked alone)
    check_one_process_switches(options)
    out = run_dir_of(args)
    inputs = [(f"--{name.replace('_', '-')}", getattr(args, name, None))
              for name in ("features", "vocab", "images", "embed_cache")]
    check_out_dir(out, args.overwrite, inputs=inputs)
    check_seed(args.seed)
    if args.threads is not None:   # here, where a torchrun job checks every process's settings together
        checked_threads(args.threads, "--threads")
    return options, out, str(fitting_device(args.device, "--device"))


# Arguments each process may set for itself: where and how fast it computes, and what it prints, not the result (as
# LAIC's PER_RANK_SETTINGS); and paths, which may differ from machine to machine for the same files (each node's own
# copy): what they name is compared instead (the features' fingerprint, the nouns, the encoder's weights).
PER_PROCESS_ARGUMENTS = ("command", "threads", "device", "profile", "quiet",
                         "features", "vocab", "out", "images", "embed_cache", "pretrained")
# Options whose flag is not their dest with dashes.
FLAGS = {"options": "--set", "stage2_options": "--stage2"}


def process_arguments(args: argparse.Namespace) -> Dict[str, object]:
    """The command line's arguments by flag, for the processes of a torchrun job to compare
    (laic.distributed.same_on_all_ranks): all but :data:`PER_PROCESS_ARGUMENTS`; a method flag not given as LAIC's
    default (which one process may give and another leave out)."""
    defaults = laic_defaults()
    given = {name: defaults[name] if name in METHOD_FLAGS.values() and value is None else value
             for name, value in vars(args).items() if not name.startswith("_") and name not in PER_PROCESS_ARGUMENTS}
    return {FLAGS.get(name, "--" + name.replace("_", "-")): value for name, value in given.items()}


def recorded_path(path) -> str:
    """An input's path as run.json records it: absolute, so that the run is read from anywhere (`laic report` from
    another folder found no features, or a same-sized file of that folder's)."""
    from .. import io

    return io.path_text(pathlib.Path(path).expanduser().resolve())


def print_fit(model, out: pathlib.Path, seconds: float) -> None:
    """What `laic fit` prints once the run is written."""
    import numpy as np

    from ..run_dir import RUN_FILES, cluster_summary

    print(f"fitted in {seconds:.1f} s")
    print(describe_text_weight(model.agreement_report_))
    print(describe_relation_share(model.relation_share_, model.usage_share_, model.attended_nouns_,
                                  model.n_clusters_))
    print(describe_stage1(model.stage1_report_))
    for line in describe_refinements(getattr(model, "refine_report_", {})):
        print(line)
    print_clusters(cluster_summary(np.asarray(model.labels_), model.cluster_names_, model.n_clusters_))
    print(f"wrote {out}/ ({', '.join(f for f in RUN_FILES if (out / f).exists())})")


def describe_text_weight(report: Dict) -> str:
    """One line on how much the text side counts (``LAIC.agreement_report_``)."""
    if not report:
        return "text side: no agreement recorded"
    if not report.get("use_text", True):
        return "text side: off (use_text=False): image-only"
    neighbour = (f"text side: weight {report['agreement']:.3f} = neighbour agreement "
                 f"{report['neighbour_agreement']:.3f} (raw {report['raw_neighbour_agreement']:.3f}, random nouns "
                 f"{report['null_neighbour_agreement']:.3f})")
    if not report.get("partition_weighting", True):
        return f"{neighbour}; partition weighting off"
    return (f"{neighbour} x {report['text_weight_factor']:.2f} for a partition agreement of "
            f"{report['partition_agreement']:.3f}")


def describe_relation_share(share: float, usage_share: float = 0.0, attended: float = float("nan"),
                            n_clusters: int = 0) -> str:
    """One line on what the fused space holds for the images (``LAIC.relation_share_``) and, where relation features
    were made (for the fused space, ``relation_view`` or the relation neighbour filter), how they weight the kept
    nouns (``usage_share_``, ``attended_nouns_``: the attended nouns, a usage's effective number, against the
    ``n_clusters`` clusters)."""
    weighting = ""
    if attended == attended:   # measured (not NaN)
        weighting = (f"; nouns weighted {usage_share:.2f} by their usage, {attended:.0f} attended nouns for "
                     f"{n_clusters} clusters")
    if share <= 0.0:
        return "fused space: the centred image features" + (
            f" (relation features: laic.relations{weighting})" if weighting else "")
    return (f"fused space: the image features moved {share:.2f} of the way to the relation features "
            f"(laic.relations{weighting})")


def describe_stage1(report: Dict) -> str:
    """One line on stage 1's label-free keep/drop decision (``LAIC.stage1_report_``)."""
    if not report:
        return "stage 1: no decision recorded"
    if not report.get("ran"):
        return "stage 1: not run (stage1_steps = 0, or fewer than min_cluster_size images a cluster)"
    verdict = "kept" if report["kept"] else "not kept: the fused k-means partition stands"
    return (f"stage 1: {verdict} (fused-space distortion {report['distortion_rise']:+.1%}, at most "
            f"{report['max_distortion_rise']:.0%}; {report['stage1_clusters']} of {report['stage0_clusters']} "
            f"clusters used, at least {report['min_clusters_kept']:.0%}; {report['moved']:.1%} of images moved)")


def describe_refinements(report: Dict) -> List[str]:
    """A line per refinement that ran (``LAIC.refine_report_``): whether stage 1's test kept the semantic
    pseudo-labels (--pseudo-labels semantic: the option alone does not say whether they changed anything), and how
    many images the semantic centres (--semantic-centres) moved."""
    lines = []
    pseudo = report.get("semantic_pseudo_labels")
    if pseudo:
        verdict = "kept" if pseudo["kept"] else "not kept: the partition before them stands"
        lines.append(f"semantic pseudo-labels: {verdict} (fused-space distortion {pseudo['distortion_rise']:+.1%}, "
                     f"at most {pseudo['max_distortion_rise']:.0%}; {pseudo['stage1_clusters']} of "
                     f"{pseudo['stage0_clusters']} clusters used; {pseudo['moved']:.1%} of images moved; "
                     f"{pseudo['pseudo_labelled']} images pseudo-labelled)")
    if "semantic_centres" in report:
        lines.append(f"semantic centres ({report['semantic_centres']}): {report['semantic_centres_moved']:.1%} of "
                     "images moved")
    return lines


def new_model(args: argparse.Namespace, n_clusters, k_range, device: str, options: Dict):
    """The LAIC that `laic fit` (--features or --images) fits: the command's K, seed, device and options."""
    from ..model import LAIC

    return LAIC(n_clusters=n_clusters, k_range=k_range, random_state=args.seed, device=device, **options,
                **({"profile": True} if args.profile else {}))


@contextlib.contextmanager
def arguments_named_as_flags(args: argparse.Namespace, images_flag: str):
    """LAIC.fit's refusals of its data (all rows one direction, say) start with the argument they refuse,
    ``image_features:``: on the command line that is ``images_flag`` (``--features PATH``, ``--images DIR``) and
    ``--vocab DIR`` (a user of `laic fit` never wrote image_features)."""
    flags = {"image_features": images_flag, "noun_features": f"--vocab {args.vocab}",
             "noun_names": f"--vocab {args.vocab}"}
    try:
        yield
    except ValueError as exc:
        message = str(exc)
        name = next((name for name in flags if message.startswith(name + ":")), None)
        if name is None or len(exc.args) != 1:
            raise
        raise type(exc)(flags[name] + message[len(name):]) from exc


def publish_fit(args: argparse.Namespace, world, model, out: pathlib.Path, seconds: float, run_info: Dict,
                published: Callable[[], None], features=None, image_paths=None,
                kept_aside: Callable[[], None] = lambda: None) -> int:
    """The end of `laic fit` on process 0 (the others wait for it): RUN_DIR published (``published`` runs once it
    is; ``kept_aside`` once the finished run is kept beside a RUN_DIR that changed meanwhile: laic.run_dir.
    publish_run), and the clustering (and with --profile the profile) printed."""
    from ..distributed import from_main
    from ..run_dir import publish_run

    if world.size > 1:
        run_info["processes"] = world.size

    def write():
        publish_run(out, lambda folder: write_fit(folder, model, run_info, args.profile, features, image_paths),
                    args.overwrite, published=published, kept_aside=kept_aside)

    from_main(world.group, write, "writing the run")
    print_fit(model, out, seconds)
    if args.profile:
        print_profile(model, out)
    return 0


def write_fit(folder: pathlib.Path, model, run_info: Dict, profiled: bool, features=None, image_paths=None) -> None:
    """The run of `laic fit` (--features or --images) into ``folder``: the model and its clustering, and with
    ``profiled`` (--profile) the model's profile (laic.profiling.write: profile.json, and trace.json when traced)."""
    from ..profiling import write
    from ..run_dir import write_run

    write_run(folder, model, run_info, features, image_paths)
    if profiled:
        write(folder, model)


def print_profile(model, out: pathlib.Path) -> None:
    """What `laic fit --profile` prints once the run is written: where the profile went, and its table."""
    from ..profiling import table

    profiler = getattr(model, "profiler_", None)
    trace = f", Chrome trace {out / 'trace.json'}" if profiler is not None and profiler.has_trace else ""
    print(f"profile ({out / 'profile.json'}{trace}):\n{table(model.profile_)}")
