"""The `edgeguard` command line: one click group. Heavy modules load inside the commands that need them."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .errors import EdgeguardError


class _Group(click.Group):
    """Turns EdgeguardError into a one-line message and its exit code (2 bad input, 1 failed check)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeguardError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun with --resume to continue where it stopped", err=True)
            sys.exit(130)


data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                                help="Folder holding the data sets (default: $EDGEGUARD_DATA_ROOT).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="edgeguard")
def main(verbose: bool) -> None:
    """edgeguard: keep an edge classifier from being reused on unauthorised domains."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.option("--arch", default="small_cnn", show_default=True, help="Architecture (see `edgeguard models`).")
@click.option("--domain", required=True, help="Authorised (source) domain, e.g. mnist (see `edgeguard domains`).")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Epochs (default: ~300k images seen, 5 to 30 epochs).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt, written after each epoch.")
@data_root_option
@device_option
def train(arch, domain, epochs, out, batch_size, lr, seed, resume, data_root, device) -> None:
    """Train a source model from random init on an authorised domain."""
    from .source import train_source

    r = train_source(arch, domain, out, epochs=epochs, data_root=data_root, device=device,
                     batch_size=batch_size, lr=lr, seed=seed, resume=resume)
    click.echo(f"{arch} on {domain}: test accuracy {r['test_accuracy'] * 100:.2f}% after {r['epochs']} epochs "
               f"({r['seconds']:.0f} s, {r['images_per_second']:.0f} images/s) → {out}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Show sparsity per layer.")
def info(file, as_json, layers) -> None:
    """Describe a model file: architecture, method, accuracies, sparsity per layer, mask hash."""
    from .artifact import load_artifact

    art = load_artifact(file)  # full load: also verifies the mask against the weights
    meta = art.meta
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    click.echo(f"file          {file}")
    click.echo(f"architecture  {meta['arch']} ({meta['num_classes']} classes: {', '.join(meta['classes'])})")
    click.echo(f"method        {meta['method']}"
               + (f" ({meta['method_config'].get('setting')})" if meta["method_config"].get("setting") else ""))
    click.echo(f"source        {meta['source_domain']}")
    if meta.get("target_domains"):
        click.echo(f"targets       {', '.join(meta['target_domains'])}")
    for key, val in meta.get("accuracies", {}).items():
        click.echo(f"accuracy      {key}: {val * 100:.2f}%")
    m = meta.get("mask")
    if not m:
        click.echo("mask          none (dense model)")
        return
    click.echo(f"mask sha256   {m['sha256']}")
    click.echo(f"sparsity      {m['sparsity'] * 100:.2f}% ({m['total'] - m['kept']:,} of {m['total']:,} weights pruned)")
    if layers:
        for name, s in m["sparsity_per_layer"].items():
            click.echo(f"  {name:<40} {s * 100:6.2f}%")


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
@click.option("--target", required=True, help="Unauthorised domain the attacker fine-tunes on.")
@click.option("--attack", "attacks", multiple=True, default=["direct-all/masked"], show_default=True,
              help="direct-all | direct-head | initfc-all | initfc-head, then /masked or /free. Repeatable.")
@click.option("--grid", default=None, help="Comma-separated sample ratios (default: NTP's 10-point grid).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.json, report.md, plots and the resumable run log.")
@click.option("--unprotected", type=click.Path(dir_okay=False), default=None,
              help="The source model before protection, for its reference curve and ΔS/ΔT.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=8e-4, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-train", type=click.IntRange(min=1), default=None, help="Cap the target training pool.")
@click.option("--max-test", type=click.IntRange(min=1), default=None, help="Cap the target test set.")
@data_root_option
@device_option
def evaluate_cmd(file, target, attacks, grid, seeds, report_dir, unprotected, optimizer, lr, weight_decay, epochs,
                 batch_size, max_train, max_test, data_root, device) -> None:
    """Fine-tune the model on growing target subsets and compare with training from scratch (SLC-AUC)."""
    from .evaluation.attack import parse_attack
    from .evaluation.runner import EvalConfig, evaluate_model
    from .evaluation.slc_auc import parse_grid

    recipes = [parse_attack(a, optimizer=optimizer, lr=lr, weight_decay=weight_decay, epochs=epochs,
                            batch_size=batch_size) for a in attacks]
    cfg = EvalConfig(target=target, attacks=recipes, grid=parse_grid(grid), seeds=seeds, max_train=max_train,
                     max_test=max_test, device=device, data_root=data_root)
    res = evaluate_model(file, cfg, report_dir, unprotected=unprotected)
    for e in res["attacks"]:
        m, s = e["slc_auc"]
        extra = f" (unprotected {e['unprotected_slc_auc'][0]:+.3f})" if "unprotected_slc_auc" in e else ""
        click.echo(f"{e['attack']:<22} SLC-AUC {m:+.3f} ± {s:.3f}{extra}")
    click.echo(f"report: {Path(report_dir) / 'report.md'}")


@main.command()
def models() -> None:
    """List the architectures."""
    from .models import list_models

    for name, desc in list_models().items():
        click.echo(f"  {name:<20} {desc}")


@main.command()
@click.option("--out", default="edgeguard-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's models and report.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True, help="Source training epochs.")
@device_option
def demo(out, epochs, device) -> None:
    """Run the whole chain on the embedded digit sample (CPU, a few minutes)."""
    from .demo import run_demo

    run_demo(Path(out), epochs=epochs, device=device, echo=click.echo)


if __name__ == "__main__":
    main()
