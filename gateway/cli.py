"""The `lockgate` command: serve, check, keys, usage, models, batch."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from policies.keys import hash_key, new_key
from policies.loader import PolicyError, load_policy


def _cmd_serve(args: argparse.Namespace) -> int:
    # What a start imports and builds lives as long as the process: full collections walking it as it grew took
    # ~0.1 s of each start. A worker collects once and freezes it before it serves, then turns the collector on
    # again (gateway/server.py); a supervisor of several workers turns it on at once.
    gc.disable()
    from gateway.supervisor import ServeOptions, serve

    try:
        loaded = load_policy(args.policy)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    server = loaded.policy.server
    table = loaded.policy.inference_table
    workers = args.workers or server.workers
    options = ServeOptions(
        policy_path=args.policy,
        host=args.host or server.host,
        port=server.port if args.port is None else args.port,
        workers=workers,
        shutdown_timeout_s=server.shutdown_timeout_s,
    )
    return serve(options, table if table.enabled else None)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.policy)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    policy = loaded.policy
    if args.explain:
        from policies import explain

        if args.explain not in policy.users:
            print(f"user {args.explain!r} is not defined under 'users'", file=sys.stderr)
            return 1
        print(explain(policy, args.explain))
        return 0
    print(f"{args.policy}: OK (version {loaded.sha256[:12]}: {len(policy.keys)} keys, {len(policy.users)} users, "
          f"{len(policy.providers)} providers, {len(policy.routes)} routes)")
    from policies.prices import unpriced_models

    for route, model in unpriced_models(policy):
        print(f"warning: routes.{route}: model {model!r} has no entry under 'prices': its requests are recorded at "
              "cost 0 and budgets do not count them", file=sys.stderr)
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    key = new_key()
    key_id = args.id or f"{args.user}-{hash_key(key)[:6]}"
    print(f"key (shown once, give it to {args.user}): {key}", file=sys.stderr)
    print(f'  - {{id: {key_id}, sha256: "{hash_key(key)}", user: {args.user}}}')
    return 0


def _cmd_usage(args: argparse.Namespace) -> int:
    from gateway.inference import report

    try:
        table = load_policy(args.policy).policy.inference_table
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    print(report(args.clickhouse or table.clickhouse, table.database, args.since, args.until))
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from runtime import list_models

    for info in list_models():
        state = "prepared" if info.prepared else "not prepared"
        print(f"{info.name}\t{state}\t{info.path}\n    {info.description}")
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from runtime import RuntimeFailure, prepare_model

    # The conversion's own progress bar belongs on a terminal; a log or CI gets the step lines alone.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    started = time.monotonic()

    def step(line: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {line}", file=sys.stderr, flush=True)

    try:
        path = prepare_model(args.name, progress=step)
    except RuntimeFailure as exc:
        print(f"cannot prepare {args.name}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_batch_run(args: argparse.Namespace) -> int:
    try:
        from gateway.batch.cli_run import RunOptions, run
    except KeyboardInterrupt:
        # Ctrl-C before the command began (importing the gateway takes a second): nothing ran, nothing to resume.
        print("lockgate batch run: interrupted before any line ran", file=sys.stderr)
        return 130
    return run(RunOptions(Path(args.input), args.route, Path(args.out), Path(args.policy), args.key, args.concurrency))


def _concurrency(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be from 1 to 1024")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lockgate", description="A governed AI gateway.")
    verbs = top.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the gateway on a policy file")
    serve.add_argument("policy")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(run=_cmd_serve)

    check = verbs.add_parser("check", help="validate a policy file and print every problem with its line")
    check.add_argument("policy")
    check.add_argument("--explain", metavar="USER", help="print which routes USER may call, and why")
    check.set_defaults(run=_cmd_check)

    keys = verbs.add_parser("keys", help="issue API keys").add_subparsers(dest="keys_verb", required=True)
    keys_new = keys.add_parser("new", help="print a fresh key once, and the `keys:` line with its hash")
    keys_new.add_argument("--user", required=True)
    keys_new.add_argument("--id")
    keys_new.set_defaults(run=_cmd_keys_new)

    usage = verbs.add_parser("usage", help="top users, routes, cost and errors from the inference table")
    usage.add_argument("policy", help="the policy file whose inference_table to read")
    usage.add_argument("--since", default="24h", help="30m, 24h, 7d, 2w or an ISO time (default 24h)")
    usage.add_argument("--until", default="now")
    usage.add_argument("--clickhouse", help="read this DSN instead of the policy's")
    usage.set_defaults(run=_cmd_usage)

    models = verbs.add_parser("models", help="models the embedded runtime can serve").add_subparsers(
        dest="models_verb", required=True)
    models.add_parser("list", help="the catalog and what is prepared").set_defaults(run=_cmd_models_list)
    prepare = models.add_parser("prepare", help="convert a packaged model into a folder vLLM loads (once)")
    prepare.add_argument("name")
    prepare.set_defaults(run=_cmd_models_prepare)

    batch = verbs.add_parser("batch", help="batch inference without a client").add_subparsers(
        dest="batch_verb", required=True)
    batch_run = batch.add_parser("run", help="run an OpenAI batch file through the gateway's pipeline in this "
                                 "process; rerun the same command to resume")
    batch_run.add_argument("input", metavar="IN.jsonl", help="OpenAI batch lines: {custom_id, method, url, body}")
    batch_run.add_argument("--route", required=True, help="the route every line calls (sets each body's model)")
    batch_run.add_argument("--out", required=True, metavar="OUT.jsonl",
                           help="one result line per custom_id, failed ones too; appended to on a rerun")
    batch_run.add_argument("--policy", default=os.environ.get("LOCKGATE_POLICY", "policies.example.yaml"),
                           help="the policy file (default: $LOCKGATE_POLICY, else policies.example.yaml)")
    batch_run.add_argument("--key", help="the API key lines run as (default: $LOCKGATE_API_KEY, which ps does not show)")
    batch_run.add_argument("--concurrency", type=_concurrency,
                           help="lines in flight at once (default: the route's batch.concurrency)")
    batch_run.set_defaults(run=_cmd_batch_run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
