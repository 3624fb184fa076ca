"""The ``phaul`` command line: argument parsing and the one place errors become exit codes.

Each subcommand's work lives in its own module; this file only declares options and dispatches.
Errors are printed as one line (``phaul: error: ...``) with the documented exit code
(phaul.errors); the traceback goes to the log (``--debug`` shows it on the terminal).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from phaul import __version__
from phaul.errors import EXIT_CODES, PhaulError

log = logging.getLogger("phaul")

EXIT_CODE_HELP = "exit codes: 0 ok; " + "; ".join(
    f"{code} {name}" for name, code in sorted(EXIT_CODES.items(), key=lambda kv: kv[1]) if code
)

Handler = Callable[[argparse.Namespace], int]


def _cmd_check(args: argparse.Namespace) -> int:
    from phaul.engine.criu_locate import cmd_check

    return cmd_check(args)


def _cmd_agent(args: argparse.Namespace) -> int:
    from phaul.target.agent import cmd_agent

    return cmd_agent(args)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from phaul.source.migrate import cmd_migrate

    return cmd_migrate(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from phaul.source.launch import cmd_run

    return cmd_run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from phaul.demo import cmd_demo

    return cmd_demo(args)


def _cmd_certs(args: argparse.Namespace) -> int:
    from phaul.certs import cmd_certs

    return cmd_certs(args)


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mutual TLS (all three together; then no token is needed)")
    g.add_argument("--tls-cert", metavar="FILE", help="our certificate (phaul certs host)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key")
    g.add_argument("--tls-ca", metavar="FILE", help="CA certificate the peer must be signed by")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phaul",
        description=(
            "Live-migrate a running Linux process tree (memory, files, established TCP "
            "connections, its IP address) to another host with CRIU. Run `phaul agent` on the "
            "target, then `phaul migrate PID --to HOST:PORT` on the source. New here? "
            "Try `phaul demo`."
        ),
        epilog=EXIT_CODE_HELP,
    )
    p.add_argument("--version", action="version", version=f"phaul {__version__}")
    p.add_argument("--debug", action="store_true", help="log everything, tracebacks included")
    p.add_argument("--log-file", help="also write the full log (with tracebacks) to this file")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check", help="show which CRIU phaul uses and whether it works here")
    c.add_argument("--criu", help="CRIU binary to check (default: config, $PHAUL_CRIU, PATH)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_cmd_check)

    a = sub.add_parser(
        "agent",
        help="receive migrations on this host (foreground daemon)",
        description=(
            "Receive migrations. Every connection must authenticate first: with --token-file "
            "both sides prove they know the token (HMAC challenge-response; the token never "
            "crosses the wire, but the traffic is NOT encrypted: use it in trusted labs only)."
        ),
    )
    a.add_argument("--listen", default="0.0.0.0:7707", metavar="ADDR:PORT")
    a.add_argument("--token-file", metavar="FILE", help="shared secret (mode 0600 or stricter)")
    a.add_argument(
        "--workdir",
        default="/var/lib/phaul",
        metavar="DIR",
        help="where images, logs and the journal go (default: %(default)s)",
    )
    a.add_argument(
        "--ip-dev",
        metavar="DEV",
        help="device for moved addresses (default: the one with a route to them)",
    )
    a.add_argument("--criu", help="CRIU binary (default: config, $PHAUL_CRIU, PATH)")
    a.add_argument(
        "--netns",
        metavar="PATH",
        help="restore into this network namespace (e.g. /run/netns/x); default: own",
    )
    a.add_argument(
        "--stdio",
        action="store_true",
        help="serve one session on stdin/stdout (what `phaul migrate --to ssh://` runs)",
    )
    _add_tls_options(a)
    lim = a.add_argument_group("limits (what a peer may do)")
    lim.add_argument(
        "--allow-source",
        action="append",
        default=[],
        metavar="CIDR",
        help="accept connections only from these networks (repeatable; default: any); "
        "others are closed before any byte is exchanged",
    )
    lim.add_argument(
        "--allow-cn",
        action="append",
        default=[],
        metavar="NAME",
        help="with TLS: accept only peer certificates with this CN (repeatable)",
    )
    lim.add_argument(
        "--max-sessions", type=int, default=4, metavar="N", help="concurrent migrations (4)"
    )
    lim.add_argument(
        "--max-image-mib",
        type=int,
        default=0,
        metavar="N",
        help="disk quota of one migration's images and pages in MiB (default 0: none)",
    )
    lim.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="drop a peer that sends nothing for S seconds and roll its migration back (60)",
    )
    sm = a.add_argument_group("self-migration service (phaul.client.migrate_self)")
    sm.add_argument(
        "--self-socket",
        nargs="?",
        const="/run/phaul/self.sock",
        metavar="PATH",
        help="listen on this unix socket for processes that ask to move or checkpoint "
        "themselves (default PATH: %(const)s)",
    )
    sm.add_argument(
        "--self-socket-group",
        metavar="GROUP",
        help="only this group may use the self socket (mode 0660; default 0666: any user)",
    )
    a.set_defaults(func=_cmd_agent)

    m = sub.add_parser(
        "migrate",
        help="move a running process tree to another host",
        description=(
            "Move process PID and its children to the host where `phaul agent` runs. The tree "
            "stays frozen on this host until the target confirms that it runs there; any failure "
            "before that resumes it here, unchanged."
        ),
        epilog=EXIT_CODE_HELP,
    )
    m.add_argument("pid", type=int, metavar="PID", help="root of the process tree to move")
    m.add_argument("--to", required=True, metavar="HOST:PORT", help="address of the target agent")
    m.add_argument("--token-file", metavar="FILE", help="shared secret of the target agent")
    m.add_argument(
        "--move-ip",
        action="append",
        default=[],
        metavar="ADDR/PREFIX",
        help="address to move with the tree (repeatable; default: the non-loopback "
        "addresses the tree's sockets are bound to)",
    )
    m.add_argument("--no-move-ip", action="store_true", help="move no address at all")
    m.add_argument("--report", metavar="FILE.json", help="write a JSON report of the migration")
    m.add_argument("--criu", help="CRIU binary (default: config, $PHAUL_CRIU, PATH)")
    m.add_argument(
        "--workdir",
        default="/var/lib/phaul",
        metavar="DIR",
        help="where the source keeps its small images and logs",
    )
    m.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="give up (and roll back) if the target has not restored in S seconds",
    )
    m.add_argument("--json", action="store_true", help="progress events as JSON lines on stdout")
    pc = m.add_argument_group(
        "pre-copy",
        "Memory is copied while the tree runs, then again what it wrote meanwhile, until the "
        "predicted freeze fits --max-downtime; the final dump then moves only the last writes.",
    )
    pc.add_argument(
        "--precopy",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on when the tree has at least 16 MiB of private memory "
        "(off = plain stop-and-copy, the baseline)",
    )
    pc.add_argument(
        "--tracker",
        choices=("auto", "uffd", "hash", "soft-dirty"),
        default="auto",
        help="how written pages are found: userfaultfd write-protect (exact, "
        "kernel >= 6.7), soft-dirty bits, or content hashing (any kernel)",
    )
    pc.add_argument(
        "--max-downtime",
        type=float,
        default=300.0,
        metavar="MS",
        help="stop pre-copy once the predicted freeze is below MS (default 300)",
    )
    pc.add_argument(
        "--max-iterations",
        type=int,
        default=8,
        metavar="N",
        help="at most N pre-copy passes (default 8)",
    )
    pc.add_argument(
        "--on-no-converge",
        choices=("throttle", "stop-and-copy", "abort"),
        default="throttle",
        help="when the tree writes faster than the link: cap its CPU in steps "
        "(default), just do the final dump, or give up (nothing changed)",
    )
    pc.add_argument(
        "--restore",
        choices=("auto", "eager", "lazy"),
        default="auto",
        help="lazy: the tree resumes on the target before its memory is in (a local CRIU "
        "lazy-pages daemon fills it from the pre-copy images; freeze time independent of "
        "memory size; the source stays frozen until all memory is in). eager: CRIU copies all "
        "memory before resuming. auto: lazy from 256 MiB with pre-copy",
    )
    pc.add_argument(
        "--final-dump",
        choices=("auto", "lazy"),
        default="auto",
        help="how CRIU dumps the frozen tree after pre-copy. auto: an incremental dump that "
        "takes the changed pages from phaul's tracker, so nothing is pinned and the freeze "
        "does not grow with memory (needs the shim deploy/setup.sh builds; falls back to lazy "
        "for trees with shared anonymous or locked memory). lazy: CRIU pins every page of "
        "the tree (~80 ms/GiB here)",
    )
    pc.add_argument(
        "--compress",
        choices=("none", "lz4", "zstd"),
        default="none",
        help="compress pre-copy pages (helps on slow links; zero pages are always "
        "sent as markers only)",
    )
    _add_tls_options(m)
    s = m.add_argument_group("SSH (--to ssh://[user@]host[:port]; uses ssh-agent and ~/.ssh)")
    s.add_argument(
        "--ssh-accept-unknown",
        action="store_true",
        help="accept and record an unknown host key (a changed key is always refused)",
    )
    s.add_argument("--ssh-known-hosts", metavar="FILE", help="default: ~/.ssh/known_hosts")
    s.add_argument("--ssh-key", action="append", default=[], metavar="FILE", help="private key")
    s.add_argument(
        "--ssh-agent-command",
        default="phaul agent --stdio",
        metavar="CMD",
        help="command that runs the agent there (default: %(default)s)",
    )
    m.set_defaults(func=_cmd_migrate)

    r = sub.add_parser(
        "run",
        help="start a command as a migratable workload (own pid namespace, tini as init)",
    )
    r.add_argument("--netns", metavar="PATH", help="network namespace to run in")
    r.add_argument("--pidfile", metavar="FILE", help="write the workload's root PID here")
    r.add_argument("--stdout", metavar="FILE", default="/dev/null")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    r.set_defaults(func=_cmd_run)

    ce = sub.add_parser("certs", help="make a small CA and host certificates for mutual TLS")
    cs = ce.add_subparsers(dest="certs_command", metavar="ca|host")
    ca = cs.add_parser("ca", help="create ca.pem and ca.key in DIR")
    ca.add_argument("--out", required=True, metavar="DIR")
    ch = cs.add_parser("host", help="create NAME.pem and NAME.key signed by the CA")
    ch.add_argument("name", metavar="NAME", help="host name (or IP) the certificate is for")
    ch.add_argument("--ca", required=True, metavar="DIR", help="directory of `phaul certs ca`")
    ch.add_argument("--out", required=True, metavar="DIR")
    ch.add_argument("--ip", action="append", default=[], metavar="ADDR", help="repeatable")
    ch.add_argument("--dns", action="append", default=[], metavar="NAME", help="repeatable")
    ce.set_defaults(func=_cmd_certs)

    d = sub.add_parser("demo", help="migrate a sample TCP service between two namespace hosts")
    d.add_argument("--keep", action="store_true", help="leave the demo hosts for inspection")
    d.set_defaults(func=_cmd_demo)
    return p


def setup_logging(debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    term = logging.StreamHandler(sys.stderr)
    term.setLevel(logging.DEBUG if debug else logging.INFO)
    term.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(term)
    for noisy in ("pyroute2", "asyncio", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.debug, args.log_file)
    func: Handler = args.func
    try:
        return func(args)
    except PhaulError as err:
        log.debug("failed", exc_info=True)
        print(f"phaul: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("phaul: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
