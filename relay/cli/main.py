"""Command line: ``media-relay [run] -c config.yaml`` and the operator's helper commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from relay import __version__
from relay.app import Relay, stop_signals
from relay.app.workers import PublicWorkers, label_logs, supervised
from relay.cli.audit import add_arguments as add_audit_arguments
from relay.cli.audit import cmd_audit
from relay.cli.common import load_config
from relay.cli.revoke import add_arguments as add_revoke_arguments
from relay.cli.revoke import cmd_revoke
from relay.config.errors import ConfigError
from relay.config.loading import load_filling_secrets
from relay.config.registration import write_registration
from relay.config.settings import Config
from relay.core.exit_codes import EXIT_CONFIG, EXIT_ERROR, EXIT_NEEDS_SETUP, EXIT_OK, StartupError
from relay.support.atomic import write_atomic
from relay.support.logs import setup_logging

log = logging.getLogger("relay")

EXIT_CODES_HELP = """exit codes:
  0  stopped cleanly
  1  unexpected error
  2  bad command line
  3  bad configuration (or a listener port that cannot be bound)
  4  homeserver unreachable, or it rejects the relay's as_token
  5  database unusable
  6  setup needed: a config or registration file was just created for you to edit/install
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="media-relay",
        description="Re-serve authenticated Matrix media to people outside Matrix through "
        "short-lived, signed, revocable URLs.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common_options(parser, Path("config.yaml"), False)
    # Subcommands accept the same options; SUPPRESS keeps a value given before the
    # subcommand (`media-relay -c x.yaml sign …`) from being reset by their defaults.
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the relay (the default command)")
    _add_run_options(run)
    _add_run_options(parser)

    gen = sub.add_parser(
        "generate-registration",
        parents=[common],
        help="fill 'generate' secrets in the config and write the appservice registration",
    )
    gen.add_argument("-r", "--registration", type=Path, default=Path("registration.yaml"))

    sub.add_parser(
        "check-config",
        parents=[common],
        help="validate the config without contacting the homeserver",
    )

    sub.add_parser(
        "doctor",
        parents=[common],
        help="check the config, database, homeserver and both routes to the relay; say the fixes",
    )

    sign = sub.add_parser("sign", parents=[common], help="print a signed URL for an mxc URI")
    sign.add_argument("mxc")
    sign.add_argument("--ttl", type=int, help="link lifetime in seconds (default: signing.ttl)")
    sign.add_argument("--filename", help="file name the link serves the media as")
    sign.add_argument(
        "--width", type=int, help="sign a thumbnail of this width (1-thumbnails.max_side)"
    )
    sign.add_argument(
        "--height", type=int, help="sign a thumbnail of this height (1-thumbnails.max_side)"
    )
    sign.add_argument(
        "--method",
        choices=["crop", "scale"],
        help="thumbnail method: scale fits inside, keeping the aspect (default); crop fills",
    )
    sign.add_argument(
        "--animated", action="store_true", help="keep GIF/WebP animations in the thumbnail"
    )
    sign.add_argument(
        "--force",
        action="store_true",
        help="sign even media the relay has not seen in a served room",
    )

    revoke = sub.add_parser(
        "revoke",
        parents=[common],
        help="revoke media (an mxc, or what an event, room or sender posted): links answer 410",
    )
    add_revoke_arguments(revoke)

    audit = sub.add_parser(
        "audit", parents=[common], help="list every link signed for an mxc URI (JSON lines)"
    )
    add_audit_arguments(audit)

    demo = sub.add_parser(
        "demo", help="start a throwaway local Synapse and the relay, post an image, print a link"
    )
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    demo.add_argument(
        "--once", action="store_true", help="fetch the printed link, check the bytes, and exit"
    )
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here (default: temp)")
    return parser


def _add_common_options(p: argparse.ArgumentParser, config: object, debug: object) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=config,
        help="configuration file (default: config.yaml)",
    )
    p.add_argument(
        "--debug", action="store_true", default=debug, help="debug logging and full tracebacks"
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--create-missing",
        action="store_true",
        help="if the config file does not exist, copy the example there and exit (for containers)",
    )
    p.add_argument(
        "-r",
        "--registration",
        type=Path,
        help="if this registration file does not exist, generate it and exit (for containers)",
    )
    # A public worker of public.workers (relay.app.workers): started by the primary only.
    p.add_argument("--public-worker", type=int, metavar="N", help=argparse.SUPPRESS)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: OK (homeserver {config.homeserver.address}, "
        f"links under {config.public.url}, {len(config.bridges)} bridge(s))"
    )
    return EXIT_OK


def cmd_generate_registration(args: argparse.Namespace) -> int:
    config, written = load_filling_secrets(args.config, tokens=True)
    if written:
        print(f"filled generated secrets in {args.config}")
    write_registration(config, args.registration)
    print(
        f"wrote {args.registration}: add it to the homeserver's app_service_config_files "
        "and restart the homeserver"
    )
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class Launch:
    """How this ``run`` was started: what a public worker of it needs to be started alike."""

    config_path: Path
    debug: bool
    public_worker: int | None  # this process is public worker N of a primary

    def worker_command(self, number: int) -> list[str]:
        debug = ["--debug"] if self.debug else []
        config = str(self.config_path.absolute())
        run = [sys.executable, "-m", "relay", "run", "-c", config, *debug]
        return [*run, "--public-worker", str(number)]


def cmd_run(args: argparse.Namespace) -> int:
    launch = Launch(args.config, args.debug, args.public_worker)
    if launch.public_worker is not None:
        # The primary created the files and filled the signing keys; a worker only reads.
        config = load_config(args.config)
        setup_logging(config.log_level, args.debug, config.logging.format)
        return asyncio.run(serve_until_signalled(config, launch))
    if not args.config.exists() and args.create_missing:
        example = resources.files("relay").joinpath("config.example.yaml").read_bytes()
        # 0600 from the start: it will hold the appservice tokens and signing keys.
        write_atomic(args.config, example)
        print(
            f"created {args.config} from the example. Edit at least homeserver.address, "
            "homeserver.domain, public.url and appservice.address, then start again.",
            file=sys.stderr,
        )
        return EXIT_NEEDS_SETUP
    if args.registration is not None and not args.registration.exists():
        args_gen = argparse.Namespace(config=args.config, registration=args.registration)
        cmd_generate_registration(args_gen)
        print(
            f"give {args.registration} to the homeserver, restart it, then start the relay again.",
            file=sys.stderr,
        )
        return EXIT_NEEDS_SETUP
    config = load_config(args.config, fill_signing_keys=True)
    setup_logging(config.log_level, args.debug, config.logging.format)
    return asyncio.run(serve_until_signalled(config, launch))


async def serve_until_signalled(config: Config, launch: Launch | None = None) -> int:
    """Run until SIGTERM/SIGINT: the relay, and its public workers (public.workers > 1)."""
    if launch is not None and launch.public_worker is not None:
        return await _serve_public_worker(config, launch.public_worker)
    relay = Relay(config)
    workers: PublicWorkers | None = None
    with stop_signals() as stop:
        try:
            await relay.start()
            if config.public.workers > 1 and launch is not None:
                # After the primary's own start-up: its errors are reported once, with
                # their exit codes, and the workers find the database migrated.
                workers = PublicWorkers(
                    launch.worker_command, config.public.workers - 1, relay.metrics
                )
                relay.public_workers = workers
                workers.start()
            log.info("relay %s running; SIGTERM or Ctrl-C stops it", __version__)
            await stop.wait()
            log.info("stopping")
        finally:
            if workers is not None:
                await workers.stop()
            await relay.stop()
    return EXIT_OK


async def _serve_public_worker(config: Config, number: int) -> int:
    label_logs(f"public worker {number}: ")
    relay = Relay(config, public_only=True)
    with stop_signals() as stop:
        async with supervised(stop, relay.metrics.render) as ready:
            try:
                await relay.start()
                ready()
                await stop.wait()
            finally:
                await relay.stop()
    return EXIT_OK


def _command(name: str | None) -> Callable[[argparse.Namespace], int]:
    if name == "generate-registration":
        return cmd_generate_registration
    if name == "check-config":
        return cmd_check_config
    if name == "sign":
        from relay.cli.sign import cmd_sign

        return cmd_sign
    if name == "revoke":
        return cmd_revoke
    if name == "audit":
        return cmd_audit
    if name == "doctor":
        from relay.cli.doctor import cmd_doctor

        return cmd_doctor
    if name == "demo":
        from relay.devtools.demo import cmd_demo

        return cmd_demo
    return cmd_run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", None):
        setup_logging("INFO", args.debug)
    try:
        return _command(args.command)(args)
    except ConfigError as e:
        return _fail(args, EXIT_CONFIG, *e.problems)
    except StartupError as e:
        return _fail(args, e.exit_code, str(e))
    except KeyboardInterrupt:
        return EXIT_OK
    except PermissionError as e:
        # Mostly a volume owned by another uid than the one the relay runs as.
        return _fail(args, EXIT_ERROR, f"{e}: {permission_hint()}")
    except Exception as e:
        return _fail(args, EXIT_ERROR, f"{type(e).__name__}: {e}")


def permission_hint() -> str:
    uid, gid = os.getuid(), os.getgid()
    return (
        f"the relay runs as uid {uid}, gid {gid}: give that user the file and its directory "
        "(the container image runs as 1337:1337: on the host, "
        "`sudo chown -R 1337:1337 <the directory mounted on /data>`)"
    )


def _fail(args: argparse.Namespace, code: int, *messages: str) -> int:
    """One line on stderr per problem (a config can have several), the exit code."""
    if args.debug:
        log.exception("%s", "; ".join(messages))
    for message in messages:
        print(f"media-relay: error: {message}", file=sys.stderr)
    return code
