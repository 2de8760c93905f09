"""The `rayrec` command line. Each command is a thin wrapper over one importable function.

User mistakes (rayrec.errors.UserError) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Optional

import typer
import typer.core

try:  # typer 0.2x carries its own copy of click, whose exceptions these are
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

from rayrec.errors import UserError


class OneLineErrors(typer.core.TyperGroup):
    """Click's own usage errors (an unknown option or command, a value of the wrong type, a
    missing argument) as one line and exit status 2, like every other user error, instead
    of a usage banner and a boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # `rayrec` alone: the help was printed
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="rayrec",
    cls=OneLineErrors,
    help="Tune sequential and graph recommenders with Ray Tune: train, sweep, analyse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C: a sweep stopped before its last trial


def user_errors(fn: Callable) -> Callable:
    """Turn a UserError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def echo(message: str = "") -> None:
    typer.echo(message)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


def resolve_cli_config(
    model: Optional[str],
    config: Optional[str],
    data: Optional[str],
    data_format: Optional[str],
    sets: list[str],
    seed: Optional[int] = None,
    epochs: Optional[int] = None,
):
    """One resolution path for every command (rayrec.config.command_layers, then build_config)."""
    from rayrec.config import build_config, command_layers

    return build_config(model, *command_layers(config, data, data_format, sets, seed, epochs))


SUMMARY_KEYS = ("ndcg@10", "hr@10", "mrr@10", "coverage@10", "rmse", "mae")


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...] = SUMMARY_KEYS,
                   prefix: str = "") -> str:
    parts = [f"{k} {metrics[prefix + k]:.4f}" for k in keys if prefix + k in metrics]
    return "  ".join(parts)


def summary_keys(metric: str) -> tuple[str, ...]:
    """The figures a run's summary lines show: the usual @10 ones, and for a selection metric
    at another K (graph models: recall@20) that metric with NDCG and catalogue coverage at its K."""
    k = metric.rpartition("@")[2]
    return SUMMARY_KEYS if k == "10" or "@" not in metric else (metric, f"ndcg@{k}", f"coverage@{k}", *SUMMARY_KEYS[:2])


def echo_tests(sections: dict[str, dict[str, float]], label: str, keys: tuple[str, ...] = SUMMARY_KEYS) -> None:
    """One line per test section: all users under `label`, then each test group the dataset declares
    (with the number of users evaluated, when there are groups)."""
    names = [n for n in sections if n == "test" or n.startswith("test_")]
    for name in names:
        metrics = sections[name]
        users = f"  ({int(metrics.get('n_users', 0))} users)" if len(names) > 1 else ""
        echo(f"{label if name == 'test' else name + ':':<20}{format_metrics(metrics, keys)}{users}")


FORMAT_HELP = "Reader for a --data path: grouplens, ml-1m, inter, pairs, sequences, csv, parquet, gsasrec, lightgcn."
DATA_HELP = "Named dataset (synthetic, ml-100k, ml-1m, ml-1m-gsasrec, beauty, gowalla, lastfm) or a path/URL."
SET_HELP = "Override a config value, e.g. --set train.lr=0.003 --set model.hidden=128 (repeatable)."


@app.command()
@user_errors
def train(
    model: Optional[str] = typer.Argument(None, help="Model name (`rayrec models` lists them); optional with --config."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    data_format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config (e.g. a sweep's best.yaml)."),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory (path or URL); default runs/<model>-<data>-<time>."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (train.seed)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (train.epochs)."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Warm-start weights from a checkpoint.pt, or from a sweep directory (its best checkpoint); path or URL."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar within each epoch."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train one model with the shared trainer; print validation and test metrics."""
    _setup_logging(verbose)
    cfg = resolve_cli_config(model, config, data, data_format, sets, seed, epochs)
    from rayrec.data import load_split
    from rayrec.models import check_model_data
    from rayrec.storage import check_writable
    from rayrec.train.run import default_output, train_run, warm_start_checkpoint
    from rayrec.train.trainer import NO_SELECTION

    output = output or default_output(cfg)
    check_writable(output, must_not_exist=True)  # before minutes of preprocessing and training
    metric = cfg.train.metric

    def on_epoch(trainer, record):
        best = " *" if trainer.has_validation and record.get("best_epoch") == record["epoch"] else ""
        val = format_metrics(record, (metric, "hr@10", "mae"), "val_") if trainer.has_validation else "none"
        echo(
            f"epoch {record['epoch']:>3}/{cfg.train.epochs}  loss {record['train_loss']:.4f}  "
            f"lr {record['lr']:.2e}  val {val}  {record['epoch_seconds']:.1f}s{best}"
        )

    try:
        checkpoint = warm_start_checkpoint(init_from, cfg.model_name) if init_from else None
        split = load_split(cfg.data)
        check_model_data(cfg.model_name, split)
        echo(split.summary())
        result = train_run(cfg, split, output=output, init_from=checkpoint, on_epoch=on_epoch,
                           progress=progress and sys.stderr.isatty())
    except KeyboardInterrupt:  # loading, before the first epoch ended, or a second Ctrl-C while testing
        typer.echo("error: interrupted before a run could be kept; nothing was written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    fit = result.fit
    if fit.selection == NO_SELECTION:
        echo(f"stopped: {fit.stop_reason} after {fit.epochs_run} epochs; selected: {NO_SELECTION}, "
             f"kept the last epoch's weights (epoch {fit.best_epoch})")
    else:
        echo(f"stopped: {fit.stop_reason} after {fit.epochs_run} epochs; best epoch {fit.best_epoch}")
        echo(f"valid (best epoch): {format_metrics(fit.best_metrics, summary_keys(metric), prefix='val_')}")
    echo_tests(result.tests, "test  (once):       ", summary_keys(metric))
    echo(f"run directory: {result.output}")
    if fit.stop_reason == "interrupted":
        echo(f"interrupted after {fit.epochs_run} epochs: the run holds them (summary.yaml: stop_reason interrupted)")
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command()
@user_errors
def sweep(
    model: Optional[str] = typer.Argument(None, help="Model to tune; its space is the shipped rayrec/search_spaces/<model>.yaml unless --space."),
    stage: Optional[str] = typer.Option(None, "--stage", help="smoke | quick | medium: budgets from the space's stages."),
    from_sweep: Optional[str] = typer.Option(None, "--from", help="Start from SWEEP's narrowed space (`rayrec narrow SWEEP`) and base config."),
    space: Optional[str] = typer.Option(None, "--space", help="Search-space YAML (default: the shipped rayrec/search_spaces/<model>.yaml)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    data_format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Base config YAML every trial starts from."),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default <model>-<stage>-<time>); needed for --resume."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where sweeps live: a path or s3://, gs://, ... URL (default ./sweeps or $RAYREC_STORAGE)."),
    search: Optional[str] = typer.Option(None, "--search", help="hyperopt | random | grid."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha | pbt | fifo."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Number of trials."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Epochs per trial (ASHA max_t)."),
    grace_period: Optional[int] = typer.Option(None, "--grace-period", help="ASHA: epochs before pruning."),
    reduction_factor: Optional[float] = typer.Option(None, "--reduction-factor", help="ASHA reduction factor."),
    perturbation_interval: Optional[int] = typer.Option(None, "--perturbation-interval", help="PBT: epochs between exploits (= checkpoint interval)."),
    quantile_fraction: Optional[float] = typer.Option(None, "--quantile", help="PBT: bottom/top quantile."),
    pbt_synch: bool = typer.Option(False, "--pbt-synch", help="PBT: synchronous perturbation (deterministic, slower)."),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", help="GPUs per trial; 0.25 packs four trials on one GPU."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs per trial (also its torch threads)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials running at once (default: as resources allow)."),
    max_failures: int = typer.Option(2, "--max-failures", help="Retries of a failed trial from its last checkpoint."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="online | offline | off (default: online with an API key, else offline)."),
    seed: int = typer.Option(0, "--seed", help="Searcher seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep --name: finished trials kept, others resumed from checkpoints."),
    no_test: bool = typer.Option(False, "--no-test", help="Skip evaluating the best checkpoint on test after the sweep."),
    verbose: int = typer.Option(1, "--verbose", "-v", count=False, help="Ray progress detail: 0 quiet, 1 concise, 2 full."),
) -> None:
    """Tune a model with Ray Tune: parallel trials, pruning, and a reproducible best config."""
    _setup_logging(verbose > 1)
    from rayrec.experiment import resume_hint
    from rayrec.tune.sweep import SweepOptions, run_sweep, summary_table

    opts = SweepOptions(
        model=model, name=name, storage=storage, space=space, stage=stage, from_sweep=from_sweep, config=config, data=data,
        sets=([f"data.format={data_format}"] if data_format is not None else []) + list(sets), search=search, scheduler=scheduler, num_samples=num_samples, max_epochs=max_epochs,
        grace_period=grace_period, reduction_factor=reduction_factor, perturbation_interval=perturbation_interval,
        quantile_fraction=quantile_fraction, pbt_synch=pbt_synch, gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent, max_failures=max_failures, address=address,
        wandb=wandb, seed=seed, resume=resume, verbose=verbose, evaluate_test=not no_test,
    )
    try:
        result = run_sweep(opts)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's loop: Tune's state is saved
        typer.echo(f"error: interrupted; continue with {resume_hint(None, opts.name, opts.storage)}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    metric = result.metric
    status = result.status
    if result.already_complete:
        echo(f"sweep '{result.experiment}' is already complete ({status.describe()}, exported {status.exported}); "
             "nothing to resume, nothing rewritten")
    echo(summary_table(result, metric))
    if result.best:
        partial = " (best so far: the sweep is unfinished)" if status.partial else ""
        echo(f"best trial {result.best['trial_id']}: val {metric} {result.best['value']:.4f}{partial}")
        if "test" in result.best:
            echo_tests(result.best, "best checkpoint on test (once): ")
    echo(f"results: {result.experiment}  (trials.parquet, history.parquet, best.yaml, summary.yaml)")
    if status.partial:
        echo(f"interrupted ({status.describe()}): best.yaml and summary.yaml are marked partial and test was not "
             f"evaluated; continue with {resume_hint(result.experiment, storage=opts.storage)}")
        raise typer.Exit(EXIT_INTERRUPTED)
    echo(f"reproduce: rayrec train --config {result.experiment}/best.yaml")


@app.command()
def models() -> None:
    """List the registered models and their kind ('rating' for rating-prediction models)."""
    from rayrec.models import MODELS, get_model_spec

    for name in MODELS:
        spec = get_model_spec(name)
        echo(f"{name:10s} {'rating' if spec.model_cls.task == 'rating' else spec.kind}")


SWEEP_ARG_HELP = "Sweep: its directory or URL, or its name under --storage."
STORAGE_HELP = "Where sweeps live when SWEEP is a name (default ./sweeps or $RAYREC_STORAGE)."


@app.command()
@user_errors
def narrow(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help=SWEEP_ARG_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    top_fraction: float = typer.Option(0.2, "--top-fraction", help="Ranges come from this share of the best completed trials."),
    threshold: float = typer.Option(0.05, "--threshold", help="Freeze parameters whose importance is below this at the best trial's value."),
    min_trials: int = typer.Option(5, "--min-trials", help="Fewest completed trials to narrow from."),
    pad: float = typer.Option(0.1, "--pad", help="Widen each narrowed range by this share of its width (log scale for log parameters)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Budget of the next stage (default: the stage after the sweep's)."),
    top_k: int = typer.Option(5, "--top-k", help="Trials averaged into robust.yaml."),
    min_importance_trials: int = typer.Option(10, "--min-importance-trials", help="Fewest completed trials to compute importance from (else nothing is frozen)."),
) -> None:
    """Write the next stage's search space (next_space.yaml), robust.yaml and diagnostics from a finished sweep."""
    from rayrec.experiment import DIAGNOSTICS_FILE
    from rayrec.tune.diagnostics import write_diagnostics
    from rayrec.tune.narrow import export_robust, narrow_space, write_narrowing
    from rayrec.tune.results import load_results

    results = load_results(sweep_dir, storage)
    narrowing = narrow_space(results, top_fraction=top_fraction, threshold=threshold, min_trials=min_trials,
                             pad=pad, next_stage=stage, min_importance_trials=min_importance_trials)
    url = write_narrowing(results, narrowing)
    try:
        robust = export_robust(results, top_k)
    except UserError as exc:  # an invalid average must not cost the user the narrowed space
        robust = f"not written: {exc}"
    diagnostics = write_diagnostics(results)
    imp = narrowing.importance
    if imp.conclusive:
        echo("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.scores.items()))
    else:
        echo(f"importance {imp.message}; nothing frozen for low importance")
    for key, change in narrowing.changes.items():
        echo(f"  {key}: {change}")
    flagged = int((diagnostics["flags"] != "").sum()) if len(diagnostics) else 0
    echo(f"diagnostics: {flagged} of {len(diagnostics)} trials flagged ({results.file(DIAGNOSTICS_FILE)})")
    echo(f"robust config (top {top_k} averaged): {robust}")
    echo(f"next space ({narrowing.next_stage or 'no stage'}): {url}")
    echo(f"next: rayrec sweep {results.model} --from {results.experiment}")


@app.command()
@user_errors
def confirm(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help=SWEEP_ARG_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    top: int = typer.Option(3, "--top", help="Confirm the configs of this many best trials."),
    seeds: int = typer.Option(5, "--seeds", help="Training seeds per config (the trial's own seed first)."),
    max_std: float = typer.Option(0.002, "--max-std", help="Flag a config whose metric std over seeds exceeds this."),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Flag a retrained mean short of the tuning-time value by more than this."),
    robust: bool = typer.Option(False, "--robust", help="Also confirm the top-k averaged config (robust.yaml)."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs per training (also its torch threads)."),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", help="GPUs per training; 0.25 packs four on one GPU."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)."),
) -> None:
    """Retrain the top configs from scratch with several seeds in parallel on Ray; mean, std, min, max."""
    _setup_logging(False)
    from rayrec.tune.confirm import ConfirmOptions, run_confirm

    result = run_confirm(ConfirmOptions(sweep=sweep_dir, storage=storage, top=top, seeds=seeds, max_std=max_std,
                                        tolerance=tolerance, robust=robust, cpus_per_trial=cpus_per_trial,
                                        gpus_per_trial=gpus_per_trial, address=address))
    echo(f"{'config':<8}{'trial':<14}{'tuning':>8}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}  flags")
    for _, r in result.stats.iterrows():
        echo(f"{r['candidate']:<8}{str(r['trial_id'])[:13]:<14}{r['tuning_value']:>8.4f}{r['mean']:>9.4f}"
             f"{r['std']:>9.4f}{r['min']:>9.4f}{r['max']:>9.4f}  {r['flags'] or 'ok'}")
    echo(f"results: {result.experiment}/confirm.parquet, confirm.yaml")


@app.command()
@user_errors
def final(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help=SWEEP_ARG_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    config_name: str = typer.Option("best", "--config", help="best (best.yaml) | robust (robust.yaml, top-k averaged)."),
    train_on_valid: bool = typer.Option(False, "--train-on-valid", help="Train on train + validation for the best trial's epoch count."),
    force: bool = typer.Option(False, "--force", help="Evaluate on test again although final.yaml exists (recorded as forced)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Test the best of an unfinished (interrupted) sweep; recorded in final.yaml."),
) -> None:
    """Retrain the chosen config and evaluate it on test exactly once; recorded in final.yaml."""
    _setup_logging(False)
    from rayrec.tune.confirm import FinalOptions, run_final

    record = run_final(FinalOptions(sweep=sweep_dir, storage=storage, config=config_name,
                                    train_on_valid=train_on_valid, force=force, allow_partial=allow_partial))
    if record["valid"]:
        echo(f"valid (best epoch {record['best_epoch']}): {format_metrics(record['valid'])}")
    echo_tests(record, f"test  (once{', FORCED' if record['forced'] else ''}): ")
    echo(f"run: {record['run']}  record: final.yaml")


@app.command()
@user_errors
def report(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help=SWEEP_ARG_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Report folder (path or URL; default SWEEP/report)."),
) -> None:
    """Write an HTML report with figures (learning curves, rungs, PBT lineage, parameters, importance, diagnostics)."""
    from rayrec.report import build_report

    result = build_report(sweep_dir, storage, output)
    echo(f"report: {result.index}  ({len(result.figures)} figures)")


@app.command()
@user_errors
def compare(
    models: Optional[list[str]] = typer.Argument(None, help="Models to compare (`rayrec models`); popularity is always added."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help="key=value for every model, MODEL:key=value for one (repeatable)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials per model (default 12; unlimited with --minutes)."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Epochs per trial, for every model (default 8)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Wall-clock search budget per model."),
    stage: str = typer.Option("quick", "--stage", help="Space stage for the search settings other than the budget."),
    from_sweeps: list[str] = typer.Option([], "--from", help="A finished sweep per tuned model instead of searching (repeatable)."),
    seeds: int = typer.Option(5, "--seeds", help="Training seeds per model's best config."),
    metric: str = typer.Option("ndcg@10", "--metric", help="Validation metric to tune and rank on; tested on test."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level (Holm-corrected across models)."),
    name: Optional[str] = typer.Option(None, "--name", help="Comparison name (default compare-<time>); needed for --resume."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where it lives (default ./sweeps or $RAYREC_STORAGE)."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs per trial and per retrained run."),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", help="GPUs per trial and per retrained run."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials running at once."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="online | offline | off."),
    resume: bool = typer.Option(False, "--resume", help="Continue the comparison --name."),
    verbose: int = typer.Option(1, "--verbose", "-v", help="0 quiet, 1 concise, 2 full."),
) -> None:
    """Compare models on one dataset: equal tuning budgets, multi-seed retraining, test once, paired tests."""
    _setup_logging(verbose > 1)
    from rayrec.tune.compare import CompareOptions, default_name, leaderboard_text, run_compare

    name = name or (None if resume else default_name())  # known up front, for the resume hint
    opts = CompareOptions(models=list(models or []), data=data, sets=list(sets), name=name, storage=storage, stage=stage,
                          trials=trials, max_epochs=max_epochs, minutes=minutes, from_sweeps=list(from_sweeps),
                          seeds=seeds, metric=metric, alpha=alpha, cpus_per_trial=cpus_per_trial,
                          gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent, address=address, wandb=wandb,
                          resume=resume, verbose=verbose)
    try:
        result = run_compare(opts)
    except KeyboardInterrupt:  # outside Tune's loop (e.g. retraining): finished runs are kept
        typer.echo(f"error: interrupted; continue with `rayrec compare --resume --name {opts.name or '<name>'}`", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    where = result.experiment.rstrip("/").rsplit("/", 1)[-1]
    if result.interrupted:
        typer.echo(f"interrupted in {result.interrupted}'s search; continue with `rayrec compare --resume --name {where}`",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.already_complete:
        echo(f"comparison '{where}' is already complete; nothing rerun, nothing rewritten")
    echo(leaderboard_text(result, alpha))
    echo(f"results: {result.experiment}  (compare.parquet, compare_per_user.parquet, compare.yaml, report/index.html)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
