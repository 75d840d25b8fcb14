"""The `edgeguard` command line: one click group. Heavy modules load inside the commands that need them."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from .errors import EdgeguardError
from .optim_names import OPTIMIZERS


class _Group(click.Group):
    """Turns EdgeguardError into a one-line message and its exit code (2 bad input "error:", 1 failed check
    "FAILED:"), and accepts -v/--verbose anywhere on the line."""

    def main(self, args=None, prog_name=None, **extra):
        """Click's own usage errors as one line too (exit 2), not a usage block."""
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            cmd = f" {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else ""
            click.echo(f"error: {e.format_message()} (see `edgeguard{cmd} --help`)", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)

    def parse_args(self, ctx, args):
        verbose = [a for a in args if a in ("-v", "--verbose")]
        return super().parse_args(ctx, verbose[:1] + [a for a in args if a not in ("-v", "--verbose")])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeguardError as e:
            click.echo(f"{'FAILED' if e.exit_code == 1 else 'error'}: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted; {_RESUME_HINTS.get(ctx.invoked_subcommand, 'nothing was left half-written')}",
                       err=True)
            sys.exit(130)
        except OSError as e:  # a file or folder the checks before the run could not foresee (full disk, say)
            logging.getLogger(__name__).info("details", exc_info=True)
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e} (check the path, its permissions and free space)", err=True)
            sys.exit(2)


# What an interrupted command's user does next: only options the command has.
_RESUME_HINTS = {
    "train": "rerun with --resume to continue from the last finished epoch",
    "protect": "rerun with --resume to continue from OUT.ckpt/",
    "harden": "rerun with --resume to continue from OUT.ckpt/",
    "evaluate": "rerun the same command: the finished runs in the report folder's runs.jsonl are kept and skipped",
    "build": "the previous bundle (if any) is untouched; rerun the same command",
    "deploy": "devices keep the bundle they had unless their switch completed; rerun the same command",
    "demo": "rerun `edgeguard demo` (with the same --out): it starts again from the beginning",
}


data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                                help="Folder holding the data sets (default: $EDGEGUARD_DATA_ROOT).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object on stdout (the human-readable lines go to stderr).")
class_map_option = click.option(
    "--class-map", default=None, metavar="A=X,B=Y|position",
    help="How the domain's classes pair with the model's when their names differ on purpose: DOMAIN_CLASS="
         "MODEL_CLASS pairs, or 'position' (default: by name; other names are refused).")
allow_weak_option = click.option(
    "--allow-weak", is_flag=True,
    help="Accept a protection that did not lower the target accuracy toward chance (it is recorded as weak).")


def _say(as_json: bool, line: str) -> None:
    """A human-readable line: stdout normally, stderr under --json (stdout then carries only the JSON)."""
    click.echo(line, err=as_json)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="edgeguard")
def main(verbose: bool) -> None:
    """edgeguard: keep an edge classifier from being reused on unauthorised domains."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected numbers, one per channel, e.g. '0.485 0.456 0.406', got {value!r}") from None


def input_options(fn):
    """The model's input (`edgeguard.inputspec`): size, normalisation, resize policy."""
    for opt in reversed([
        click.option("--input-size", type=click.IntRange(16, 1024), default=None,
                     help="Input H = W in pixels (default: the architecture's; 32 for the digits models)."),
        click.option("--mean", callback=_floats, default=None, help="Per-channel mean after scaling to 0..1, e.g. "
                     "'0.485 0.456 0.406' (default: ImageNet's at ≥ 64 px, else 0.5)."),
        click.option("--std", callback=_floats, default=None, help="Per-channel std (same defaults as --mean)."),
        click.option("--resize", type=click.Choice(["plain", "center-crop"]), default=None,
                     help="Frames of another size: stretch (plain) or shorter side then centre crop "
                          "(default: center-crop at ≥ 64 px, else plain)."),
        click.option("--crop", type=click.FloatRange(0.1, 1.0), default=None,
                     help="center-crop: kept share of the shorter side (0.875 = resize 256, crop 224)."),
    ]):
        fn = opt(fn)
    return fn


def _input_spec(base, input_size, mean, std, resize, crop):
    """The InputSpec from --input-size/--mean/--std/--resize/--crop over `base` (camera defaults at ≥ 64 px)."""
    from .inputspec import make_input, natural_input

    if input_size is not None and input_size >= 64 and input_size != base.shape[1]:
        base = natural_input(input_size)
    return make_input(input_size, mean, std, resize, crop, base=base)


@main.command()
@click.option("--arch", default="small_cnn", show_default=True, help="Architecture (see `edgeguard models`).")
@click.option("--domain", required=True, help="Authorised (source) domain, e.g. mnist (see `edgeguard domains`).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs (default: ~300k images seen, 5 to 30 epochs).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt, written after each epoch.")
@input_options
@data_root_option
@device_option
def train(arch, domain, epochs, out, batch_size, lr, seed, resume, input_size, mean, std, resize, crop, data_root,
          device) -> None:
    """Train a source model from random init on an authorised domain, at the model's input size."""
    from .models.registry import default_input
    from .paths import ensure_writable
    from .source import train_source

    ensure_writable(out, "--out")
    spec = _input_spec(default_input(arch), input_size, mean, std, resize, crop)
    r = train_source(arch, domain, out, epochs=epochs, data_root=data_root, device=device,
                     batch_size=batch_size, lr=lr, seed=seed, resume=resume, input_spec=spec)
    click.echo(f"{arch} on {domain}: test accuracy {r['test_accuracy'] * 100:.2f}% after {r['epochs']} epochs "
               f"({r['seconds']:.0f} s, {r['images_per_second']:.0f} images/s) → {out}")


@main.command("import")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--arch", required=True, help="How to rebuild it: torchvision:NAME, timm:NAME or package.module:function.")
@click.option("--classes", "classes_file", required=True, type=click.Path(dir_okay=False),
              help="Class names in the model's output order, one per line.")
@click.option("--source", required=True, help="Its authorised domain: imagefolder:PATH or a registered name.")
@click.option("--head", default=None, help="The final classifier layer (default: the last nn.Linear).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@input_options
@json_option
@data_root_option
@device_option
def import_(weights, arch, classes_file, source, head, out, input_size, mean, std, resize, crop, as_json, data_root,
            device) -> None:
    """Bring a model you trained yourself (safetensors or a torch state dict; nothing is unpickled)."""
    from .devices import resolve_device
    from .importer import import_weights
    from .inputspec import DIGITS_INPUT
    from .paths import ensure_writable

    ensure_writable(out, "--out")
    if input_size is None:
        raise EdgeguardError("--input-size is required: the H = W the model was trained at (e.g. 224)")
    spec = _input_spec(DIGITS_INPUT, input_size, mean, std, resize, crop)
    r = import_weights(weights, arch, classes_file, spec, source, out, head=head, data_root=data_root,
                       device=str(resolve_device(device)))
    _say(as_json, f"{arch}: head {r['head']}, encoder {', '.join(r['encoder'])}; input {'×'.join(map(str, r['input']))}"
                  f"; {r['source']} test accuracy {r['source_accuracy'] * 100:.2f}% → {out}")
    if as_json:
        _emit_json(r)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the model card as JSON.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Show sparsity per layer.")
def info(file, as_json, layers) -> None:
    """Describe a model file: architecture, method, accuracies, sparsity per layer, mask hash."""
    from .artifact import load_artifact

    card = load_artifact(file).card  # full load: also verifies the mask against the weights
    if as_json:
        _emit_json(card.to_dict())
        return
    click.echo(f"file          {file}")
    click.echo(f"architecture  {card.arch} ({card.num_classes} classes: {', '.join(card.classes)})")
    setting = card.method_config.get("setting")
    click.echo(f"method        {card.method}" + (f" ({setting})" if isinstance(setting, str) else ""))
    click.echo(f"source        {card.source_domain}")
    i = card.input
    crop = f" {i.crop:g}" if i.resize == "center-crop" else ""
    click.echo(f"input         {'×'.join(map(str, i.shape))}, mean {list(i.mean)}, std {list(i.std)}, {i.resize}{crop}")
    if card.target_domains:
        click.echo(f"targets       {', '.join(card.target_domains)}")
    for a in card.accuracies:
        before = f"{a.before * 100:.2f}% → " if a.before is not None else ""
        click.echo(f"accuracy      {a.role} {a.domain}: {before}{a.after * 100:.2f}%")
    from .strength import card_strength

    s = card_strength(card)
    click.echo(f"protection    {s.level}: {s.reason}")
    m = card.mask
    if m is None:
        click.echo("mask          none (dense model)")
        return
    click.echo(f"mask sha256   {m.sha256}")
    click.echo(f"sparsity      {m.sparsity * 100:.2f}% ({m.total - m.kept:,} of {m.total:,} weights pruned)")
    if layers:
        for name, sp in m.sparsity_per_layer.items():
            click.echo(f"  {name:<40} {sp * 100:6.2f}%")


@main.command()
@data_root_option
def domains(data_root) -> None:
    """List the registered domains and their image counts."""
    from .domains import get_domain, list_domains, resolve_data_root

    root = resolve_data_root(data_root)
    click.echo(f"data root: {root if root else '(none: set --data-root or EDGEGUARD_DATA_ROOT)'}")
    for spec in list_domains():
        if spec.folder and root is None:
            counts = "needs a data root"
        else:
            try:
                d = get_domain(spec.name, root)
                counts = f"train {len(d.train_y):>6,}  test {len(d.test_y):>6,}  classes {d.num_classes}"
            except EdgeguardError as e:
                counts = f"unavailable ({str(e).split(';')[0]})"
        click.echo(f"  {spec.name:<16} {counts:<44} {spec.description}")
    click.echo("  imagefolder:PATH  any folder of class sub-folders (PATH/CLASS/*.png, or PATH/{train,test}/CLASS/*)")


@main.command("evaluate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Unauthorised domain the attacker fine-tunes on (see `edgeguard domains`).")
@click.option("--attack", "attacks", multiple=True,
              help="direct-all | direct-head | initfc-all | initfc-head, then /masked, /free or /regrow; repeatable "
                   "(default direct-all/masked without --suite). --optimizer, --lr, --epochs … set these recipes.")
@click.option("--suite", default=None,
              help="paper | standard | robust | search (see `edgeguard attacks`) or a TOML/JSON suite file; "
                   "adds its recipes and reports the attacker's best recipe per ratio (robust SLC-AUC).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Random-search trials per model, seed and ratio (the search suite's default: 20).")
@click.option("--grid", default=None, help="Comma-separated sample ratios (default: NTP's 10-point grid).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.json, report.md, plots and the resumable run log.")
@click.option("--unprotected", type=click.Path(dir_okay=False), default=None,
              help="The source model before protection, for its reference curve and ΔS/ΔT.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=8e-4, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-train", type=click.IntRange(min=1), default=None, help="Cap the target training pool.")
@click.option("--max-test", type=click.IntRange(min=1), default=None, help="Cap the target test set.")
@click.option("--executor", type=click.Choice(["auto", "local", "processes", "ray"]), default="auto", show_default=True,
              help="auto: worker processes, one per free core, on a CPU with more than one core free, else local; "
                   "local: stacks in this process; processes: --workers processes (worker i on cuda:i mod n); "
                   "ray: one Ray task per stack (pip install -e '.[ray]').")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes for --executor processes.")
@click.option("--max-stack", type=click.IntRange(min=1), default=None,
              help="Runs trained as one stacked model (default 2 on a CPU, 32 on a GPU).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Attack arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32.")
@click.option("--ray-address", default=None, help="Ray cluster to join (auto or HOST:PORT); default: a local Ray.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs each Ray task reserves on a CPU cluster.")
@class_map_option
@data_root_option
@device_option
@json_option
def evaluate_cmd(file, target, attacks, suite, trials, grid, seeds, report_dir, unprotected, optimizer, lr, weight_decay, epochs,
                 batch_size, max_train, max_test, executor, workers, max_stack, precision, ray_address,
                 cpus_per_task, class_map, data_root, device, as_json) -> None:
    """Fine-tune the model on growing target subsets and compare with training from scratch (SLC-AUC)."""
    from .evaluation.report import verdict
    from .evaluation.runner import EvalConfig, evaluate_model
    from .evaluation.slc_auc import parse_grid
    from .evaluation.suites import get_suite, with_recipes
    from .finetune import parse_attack
    from .paths import ensure_writable

    ensure_writable(report_dir, "--report", folder=True)
    chosen = get_suite(suite).with_trials(trials) if suite else None
    if trials is not None and chosen is None:
        chosen = get_suite("search").with_trials(trials)
    if not attacks and chosen is None:
        attacks = ("direct-all/masked",)
    recipes = with_recipes(chosen, [parse_attack(a, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                                                 epochs=epochs, batch_size=batch_size) for a in attacks])
    cfg = EvalConfig(target=target, attacks=recipes, grid=parse_grid(grid), seeds=seeds, max_train=max_train,
                     max_test=max_test, device=device, data_root=data_root, workers=workers, executor=executor,
                     max_stack=max_stack, precision=precision, ray_address=ray_address,
                     cpus_per_task=cpus_per_task, suite=chosen.name if chosen else None,
                     search_trials=chosen.trials if chosen else 0, class_map=class_map)
    if not cfg.attacks and not cfg.search_trials:
        raise click.UsageError("nothing to run: give --attack or a --suite with recipes")
    res = evaluate_model(file, cfg, report_dir, unprotected=unprotected)
    _say(as_json, f"{res.engine['chosen']}, {res.engine['stacks']} stacks, {res.wall_seconds:.0f} s")
    for e in res.attacks:
        m, s = e.slc_auc
        extra = f" (unprotected {e.unprotected_slc_auc[0]:+.3f})" if e.unprotected_slc_auc is not None else ""
        _say(as_json, f"{e.attack:<22} SLC-AUC {m:+.3f} ± {s:.3f}{extra}")
    _say(as_json, f"verdict: {verdict(res)}")
    _say(as_json, f"report: {Path(report_dir) / 'report.md'}")
    if as_json:
        _emit_json({**res.to_dict(), "report": str(Path(report_dir) / "report.md")})


def _method_help(name: str) -> str:
    """One method's summary, the data it needs and every setting (type, default, meaning)."""
    from .config import format_help
    from .methods import get_method

    m = get_method(name)
    return (f"{m.name}: {m.summary}\nneeds: {m.describe_needs()}\nsettings (--set KEY=VALUE):\n"
            + format_help(m.config_cls))


def _print_method_config(ctx, param, value) -> None:
    """--help-config: every field of the chosen method's config (type, default, meaning), then exit."""
    if not value or ctx.resilient_parsing:
        return
    name = ctx.params.get("method")
    if not name:
        raise click.UsageError("--help-config needs --method NAME before it")
    click.echo(_method_help(name))
    ctx.exit(0)


@main.command()
@click.option("--method", default=None, is_eager=True,
              help="Protection method (see `edgeguard methods`); default: the one in --config.")
@click.option("--help-config", is_flag=True, expose_value=False, callback=_print_method_config,
              help="List every setting of --method (type, default, meaning) and exit.")
@click.option("--source-model", required=True, type=click.Path(dir_okay=False), help="The trained source model.")
@click.option("--target", default=None,
              help="Unauthorised domain to protect against (not needed by methods that need no target data).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Protected model file to write.")
@click.option("--setting", type=click.Choice(["source-available", "source-free", "data-free"]), default=None,
              help="MAP: which data the defender has (default source-available).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Start from an OUT.config.json that an earlier protect wrote.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any setting of the method, e.g. --set epochs=4 --set synth.n=512 (see --help-config).")
@click.option("--seed", type=int, default=None, help="Seed of the method (default: its config's, 0).")
@click.option("--then", "then", multiple=True, metavar="METHOD",
              help="Then refine the result with this method (e.g. --then harden; repeatable); its settings are "
                   "--set METHOD.KEY=VALUE. Each stage but the last is kept as OUT's stem + .METHOD.safetensors.")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt/ (written as the method runs).")
@allow_weak_option
@class_map_option
@data_root_option
@device_option
@json_option
def protect(method, source_model, target, out, setting, config_file, overrides, seed, then, resume, allow_weak,
            class_map, data_root, device, as_json) -> None:
    """Protect a source model against reuse on an unauthorised domain (then refine it: --then METHOD)."""
    from .paths import ensure_writable
    from .protect import read_config_file

    ensure_writable(out, "--out")
    if method is None:
        if config_file is None:
            raise EdgeguardError("give --method NAME (see `edgeguard methods`) or --config FILE")
        method = read_config_file(config_file)[0]
    extra = []
    if setting is not None:
        if method != "map":
            raise EdgeguardError(f"--setting is a MAP option; {method} has no setting (see --help-config)")
        extra.append(f"setting={setting}")
    if seed is not None:
        extra.append(f"seed={seed}")
    _run_chain([method, *then], source_model, out, target, [*extra, *overrides], config_file, resume, allow_weak,
               class_map, data_root, device, as_json)


def _run_chain(methods, model, out, target, overrides, config_file, resume, allow_weak, class_map, data_root,
               device, as_json) -> None:
    """The one door for protecting and refining: `protect --then` and the `harden` shortcut both come here."""
    from .protect import protect_chain

    summaries = protect_chain(methods, model, out, target=target, overrides=overrides, config_file=config_file,
                              data_root=data_root, device=device, resume=resume, class_map=class_map)
    for r in summaries[:-1]:
        _say(as_json, r.line())
    _finish_protect(summaries[-1], as_json, allow_weak)


def _finish_protect(r, as_json: bool, allow_weak: bool) -> None:
    """Print the summary; a weak protection (written, and marked weak in its card) fails unless allowed."""
    _say(as_json, r.line())
    if as_json:
        _emit_json(r.to_dict())
    if r.weak and not allow_weak:
        from .errors import CheckFailed

        raise CheckFailed(f"weak protection: {r.strength['reason']}. {r.out} is written and marked weak (build "
                          "refuses it without --allow-weak); try other settings, or pass --allow-weak to accept it")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Unauthorised domain the fine-tuning attacks train on.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Hardened model file to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any setting of the hardening, e.g. --set outer_steps=300 (see `edgeguard methods harden`).")
@click.option("--seed", type=int, default=None, help="Seed of the hardening (default 0).")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt/ (checkpointed every eval_every steps).")
@allow_weak_option
@class_map_option
@data_root_option
@device_option
@json_option
def harden(model, target, out, overrides, seed, resume, allow_weak, class_map, data_root, device, as_json) -> None:
    """Harden a model (a source model, or NTP's / MAP's output) against a distribution of fine-tuning attacks.
    The same as `protect --method harden --source-model MODEL`."""
    from .paths import ensure_writable

    ensure_writable(out, "--out")
    extra = [f"seed={seed}"] if seed is not None else []
    _run_chain(["harden"], model, out, target, [*extra, *overrides], None, resume, allow_weak, class_map,
               data_root, device, as_json)


@main.command("methods")
@click.argument("name", required=False)
def methods_cmd(name) -> None:
    """List the protection methods; with NAME, every setting of that method."""
    from .methods import list_methods

    if name:
        click.echo(_method_help(name))
        return
    for m in list_methods():
        click.echo(f"  {m.name:<10} {m.summary}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG grid to write.")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for grid.png, histogram.png and fidelity.json: the real-source accuracy of a student "
                   "distilled on the images alone, the BatchNorm-statistics distance, the class histogram.")
@click.option("-n", "n", type=click.IntRange(min=1), default=None,
              help="Images to synthesise (default: MAP's, synth.n; 64 for a grid alone).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A synthesis setting, e.g. --set recipe=deepinversion --set iterations=500 "
                   "(the synth.* settings of `edgeguard methods map`).")
@click.option("--fidelity-steps", type=click.IntRange(min=1), default=None,
              help="Optimiser steps of the --report's distilled student (default: FidelityConfig's).")
@click.option("--neighbours", is_flag=True, help="Draw the data-free neighbour domains made from them instead.")
@click.option("--seed", type=int, default=0, show_default=True)
@data_root_option
@device_option
@json_option
def synthesize(file, out, report_dir, n, overrides, fidelity_steps, neighbours, seed, data_root, device,
               as_json) -> None:
    """Synthesise pseudo-source images from a model (MAP's source-free and data-free stand-in for its source
    data); draw them, and with --report measure how good a stand-in they are."""
    from .artifact import load_artifact
    from .config import apply_overrides
    from .figures import image_grid
    from .methods.synthesis import SynthesisConfig, cached_pseudo_source, neighbour_domains
    from .paths import ensure_writable

    if out is None and report_dir is None:
        raise EdgeguardError("give --out GRID.png, --report DIR, or both")
    if out is not None:
        ensure_writable(out, "--out")
    if report_dir is not None:
        ensure_writable(report_dir, "--report", folder=True)
    from .devices import resolve_device

    device = str(resolve_device(device))  # `auto` means this machine's best, as for every other command
    art = load_artifact(file)
    cfg = apply_overrides(SynthesisConfig(init="noise", seed=seed), overrides)
    if n is not None or report_dir is None:
        cfg = dataclasses.replace(cfg, n=n or 64)
    cfg.validate()
    x, y = cached_pseudo_source(art.model, art.card.num_classes, cfg, device)
    classes = art.card.classes
    result = {"images": int(len(x)), "synthesis": dataclasses.asdict(cfg)}
    if report_dir is not None:
        from .domains import get_domain
        from .evaluation.fidelity import FidelityConfig, fidelity_report, write_synthesis_report
        from .training import TensorData

        dom = get_domain(art.card.source_domain, data_root, classes=art.card.classes, role="source",
                         input=art.card.input)
        test = TensorData.from_numpy(dom.test_x, dom.test_y)
        fcfg = FidelityConfig() if fidelity_steps is None else FidelityConfig(steps=fidelity_steps)
        rep = fidelity_report(art.model, x, test, fcfg, device=device)
        write_synthesis_report(report_dir, x, y, list(classes), rep, dataclasses.asdict(cfg))
        result.update(rep.to_dict(), report=str(report_dir))
        _say(as_json, f"{len(x)} images: fidelity {rep.fidelity * 100:.1f}% (a student distilled on them scores "
                      f"{rep.student_source_accuracy * 100:.2f}% on {art.card.source_domain}, the model "
                      f"{rep.teacher_source_accuracy * 100:.2f}%), BN distance {rep.bn_distance:.3f} → "
                      f"{report_dir}/")
    if out is not None:
        if neighbours:  # neighbour_domains makes each perturbation of every image in turn
            gx = neighbour_domains(x, seed)
            kinds = ("inverted", "channels", "tinted", "low-pass", "high-pass", "thick", "noise")
            labels = [kinds[i // len(y)] for i in range(len(gx))]
        else:
            order = np.argsort(y, kind="stable")
            labels = [classes[int(v)] for v in y[order]]
            gx = x[order]
        image_grid(gx, out, labels=labels)
        result["grid"] = str(out)
        _say(as_json, f"{len(gx)} images → {out} (labelled: "
                      f"{'perturbation' if neighbours else 'the class each was made for'})")
    if as_json:
        _emit_json(result)


@main.command("build")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--target", default="onnx", show_default=True,
              help="Hardware target: onnx | cpu | tensorrt | jetson-orin (alias jetson) | jetson-xavier.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None, help="Ed25519 private key (PEM).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Default: the target's (fp16 for TensorRT targets, fp32 otherwise).")
@click.option("--samples", type=click.IntRange(min=1), default=300, show_default=True,
              help="Validation samples per domain carried in the bundle.")
@click.option("--unauthorised", multiple=True, help="Unauthorised domains to carry (default: the model's targets).")
@click.option("--report", type=click.Path(), default=None, help="An evaluation report whose SLC-AUC goes in the manifest.")
@click.option("--ota", type=click.Choice(["mender"]), default=None,
              help="Also write OUT.mender: a signed Mender Artifact (module-image, payload edgeguard-bundle).")
@click.option("--device-type", "device_types", multiple=True,
              help="Device type the Mender Artifact installs on (repeatable), e.g. jetson-orin-nano.")
@click.option("--ota-key", type=click.Path(dir_okay=False), default=None,
              help="ECDSA P-256 key that signs the Mender Artifact (`edgeguard keygen` writes PREFIX-ota.key).")
@click.option("--ota-version", default=None, help="Artifact version (default: the manifest's sha256, 12 digits).")
@click.option("--oms-key", type=click.Path(dir_okay=False), default=None,
              help="Also sign the bundle with OpenSSF model signing (oms.sig) with this ECDSA P-256 key.")
@allow_weak_option
@class_map_option
@data_root_option
@json_option
def build_cmd(file, target, out, sign_key, precision, samples, unauthorised, report, ota, device_types, ota_key,
              ota_version, oms_key, allow_weak, class_map, data_root, as_json) -> None:
    """Export a protected model to a signed deployment bundle."""
    from .build import OtaOptions, build
    from .paths import ensure_writable

    ensure_writable(out, "--out", folder=True)
    ensure_writable(Path(out).expanduser().resolve().parent, "--out", folder=True)  # built beside it, renamed in
    if (device_types or ota_key or ota_version) and not ota:
        raise EdgeguardError("--device-type, --ota-key and --ota-version go with --ota mender")
    if ota and not ota_key:
        raise EdgeguardError("--ota mender needs --ota-key (an ECDSA P-256 key: `edgeguard keygen` writes PREFIX-ota.key)")
    opts = OtaOptions(list(device_types), ota_key, ota, version=ota_version) if ota else None
    r = build(file, out, target=target, sign_key=sign_key, precision=precision, samples=samples,
              data_root=data_root, report=report, unauthorised=list(unauthorised) or None, allow_weak=allow_weak,
              class_map=class_map, ota=opts, oms_key=oms_key)
    acc = ", ".join(f"{k} {v * 100:.1f}%" for k, v in r["accuracy"].items())
    if as_json:
        click.echo(f"bundle {r['bundle']}", err=True)
        _emit_json(r)
        return
    click.echo(f"bundle {r['bundle']} ({r['target']}, {r['precision']}, {'signed' if r['signed'] else 'UNSIGNED'}"
               f"{', OpenSSF-signed' if r.get('oms_signed') else ''}): "
               f"ONNX parity max |Δ| {r['parity']['max_abs_diff']:.1e}; {acc}")
    if "ota" in r:
        o = r["ota"]
        click.echo(f"mender artifact {o['artifact']} ({o['name']}, {', '.join(o['device_types'])}, {o['bytes']:,} bytes)")


@main.command()
@click.argument("bundle", required=False, type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, help="user@device[:port]; repeat for several devices.")
@click.option("--inventory", type=click.Path(dir_okay=False), default=None,
              help="fleet.toml: [defaults] and [[device]] tables (see examples/fleet.toml).")
@click.option("--public-key", type=click.Path(dir_okay=False), default=None,
              help="The vendor's public key; installed on devices that trust none yet, never replacing one.")
@click.option("--allow-unsigned", is_flag=True, help="Deploy and validate without a signature (bench devices).")
@click.option("--rollback", is_flag=True, help="Switch each device back to its previous bundle.")
@click.option("--force", is_flag=True, help="Redeploy even where the bundle is already current.")
@click.option("--jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Devices at once.")
@click.option("--identity", type=click.Path(dir_okay=False), default=None, help="SSH private key (ssh -i).")
@click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
              help="known_hosts file to check device keys against (default: ssh's own).")
@click.option("--accept-new-host-key", is_flag=True,
              help="Trust a device's key on first contact and record it (a changed key is still refused).")
@click.option("--remote-root", default=None, help="Bundle store on the device (default ~/edgeguard).")
@click.option("--python", "remote_python", default=None, help="Python on the device (default python3).")
@click.option("--report-dir", type=click.Path(file_okay=False), default="deploy-reports", show_default=True,
              help="Where each device's validation and latency reports are written.")
@click.option("--timeout", type=click.FloatRange(min=1), default=900, show_default=True,
              help="Seconds allowed for each remote step.")
@json_option
def deploy(bundle, hosts, inventory, public_key, allow_unsigned, rollback, force, jobs, identity, known_hosts,
           accept_new_host_key, remote_root, remote_python, report_dir, timeout, as_json) -> None:
    """Put a bundle onto devices over SSH, validate it there, and switch `current` to it (or --rollback)."""
    from .deploy import fleet
    from .deploy.inventory import load_inventory, parse_host
    from .deploy.ssh import Device
    from .paths import ensure_writable

    ensure_writable(report_dir, "--report-dir", folder=True)

    base = Device(host="", identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                  root=remote_root or "~/edgeguard", python=remote_python or "python3")
    devices = load_inventory(inventory, base) if inventory else []
    devices += [parse_host(h, base) for h in hosts]
    opts = fleet.DeployOptions(force=force, public_key=public_key, allow_unsigned=allow_unsigned,
                               report_dir=Path(report_dir), timeout=timeout)
    if rollback:
        if bundle:
            raise EdgeguardError("--rollback takes no BUNDLE: it switches each device back to its previous one")
        results = fleet.rollback(devices, opts, jobs)
    else:
        if not bundle:
            raise EdgeguardError("give the BUNDLE folder to deploy (or --rollback)")
        results = fleet.deploy(bundle, devices, opts, jobs)
    _say(as_json, fleet.format_table(results))
    _say(as_json, f"reports: {report_dir}/")
    if as_json:
        import dataclasses

        _emit_json({"ok": all(r.ok for r in results), "report_dir": str(report_dir),
                    "devices": [dataclasses.asdict(r) for r in results]})
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command()
@click.option("--out", required=True, help="Prefix: writes PREFIX.key/.pub and PREFIX-ota.key/.pub (keys 0600).")
def keygen(out) -> None:
    """Write the vendor's key pairs: Ed25519 for the bundle's own signature, ECDSA P-256 for Mender Artifacts
    and OpenSSF model signing (which take no Ed25519 key)."""
    from converters.signing import generate_keypair, generate_ota_keypair

    from .paths import ensure_writable

    ensure_writable(f"{out}.key", "--out")
    k, p = generate_keypair(out)
    ok, op = generate_ota_keypair(out)
    click.echo(f"private key {k} (keep it secret), public key {p} (put it on the devices)")
    click.echo(f"OTA key {ok} (signs Mender Artifacts and oms.sig; keep it secret), public key {op} (the Mender "
               "client's ArtifactVerifyKey; `model_signing verify key … --public_key` takes it too)")


@main.command("attacks")
@click.argument("suite", required=False)
@json_option
def attacks_cmd(suite, as_json) -> None:
    """List the attack suites; with SUITE (a name or a TOML/JSON file), its recipes one per line."""
    from .evaluation.suites import get_suite, list_suites

    suites = [get_suite(suite)] if suite else list_suites()
    if as_json:
        _emit_json([s.to_dict() for s in suites])
        return
    for s in suites:
        click.echo(f"{s.name}: {s.description}" + (f" ({s.trials} search trials)" if s.trials else ""))
        if suite:
            for r in s.recipes:
                click.echo(f"  {r.name:<20} {r.base_name:<18} {r.optimizer} lr={r.lr:g} wd={r.weight_decay:g} "
                           f"{r.epochs} ep bs={r.batch_size} schedule={r.schedule} bn={r.bn}"
                           + (f" source={r.source_fraction:g}" if r.source_fraction else "")
                           + (f" reinit={r.reinit:g}" if r.reinit else "")
                           + (f" shrink={r.shrink:g} perturb={r.perturb:g}" if r.shrink != 1 or r.perturb else "")
                           + (f" pre={r.pre}" if r.pre != "none" else ""))


@main.command()
def models() -> None:
    """List the architectures."""
    from .models import list_models

    for name, desc in list_models().items():
        click.echo(f"  {name:<20} {desc}")


@main.command()
@click.option("--out", default="edgeguard-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's models and report.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Source training epochs.")
@click.option("--method", default="map", show_default=True, callback=lambda c, p, v: _known_method(v),
              help="Protection method the demo runs (any of `edgeguard methods`).")
@click.option("--then", "then", multiple=True, metavar="METHOD",
              callback=lambda c, p, v: tuple(_known_method(m) for m in v),
              help="Then refine the protected model with this method (e.g. --then harden).")
@device_option
def demo(out, epochs, method, then, device) -> None:
    """Run the whole chain on the embedded digit sample (CPU, a few minutes)."""
    from .demo import run_demo
    from .paths import ensure_writable

    ensure_writable(out, "--out", folder=True)
    r = run_demo(Path(out), epochs=epochs, method=method, then=list(then), device=device, echo=click.echo)
    if r["validate_exit_code"]:
        sys.exit(r["validate_exit_code"])


def _known_method(name: str) -> str:
    """A registered method's name, or a usage error listing them (`list_methods()`: one registry)."""
    from .methods import list_methods

    names = [m.name for m in list_methods()]
    if name not in names:
        raise click.BadParameter(f"{name!r} is not a method; use one of {', '.join(names)}")
    return name

if __name__ == "__main__":
    main()
