"""Start-up of a fresh CLI process (issue 5): what is imported when, and that what the CLI
defers still works when something does use it. Each check runs in a fresh interpreter, since
this process has long imported everything."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_client_module_does_not_import_quic() -> None:
    """daemon/client.py imports the QUIC side in a worker thread during the bootstrap."""
    out = run_fresh("""
        import sys
        import dhtnode.cli.main, dhtnode.daemon.client
        print(sorted(m for m in sys.modules if m.startswith(("aioquic", "cryptography"))))
    """)
    assert out.strip() == "[]"


def test_cli_defers_service_identity_until_used() -> None:
    out = run_fresh("""
        import sys
        import dhtnode.cli.main
        from dhtnode.transport import quic  # imports aioquic.tls
        print(type(sys.modules["service_identity"]).__name__, "attr" in sys.modules)
    """)
    assert out.split() == ["_DeferredModule", "False"]


def test_deferred_modules_work_when_aioquic_uses_them() -> None:
    """A certificate check with a server name (never asked for by dhtnode) reaches
    service_identity and certifi through the stand-ins and gets the answer it gets without."""
    code = """
        {prelude}
        from aioquic import tls
        from dhtnode.crypto.certs import make_certificate
        from dhtnode.crypto.identity import Identity
        cert = make_certificate(Identity.generate()).certificate
        try:
            tls.verify_certificate(cert, server_name="example.com")
        except tls.AlertBadCertificate as exc:
            print("bad-certificate:", exc)
        import certifi, service_identity
        print(certifi.where().endswith(".pem"), type(service_identity).__name__)
        print(tls.service_identity.VerificationError is service_identity.VerificationError)
    """
    deferred = run_fresh(code.format(prelude="import dhtnode.cli.main"))
    plain = run_fresh(code.format(prelude="pass"))
    assert deferred == plain
    assert deferred.startswith("bad-certificate:")
    assert deferred.split()[-3:] == ["True", "module", "True"]


def test_lazy_logging_imports_structlog_only_for_an_event_at_its_level() -> None:
    out = run_fresh("""
        import io, json, logging, sys
        from dhtnode.daemon.logging import configure_logging, get_logger
        buf = io.StringIO()
        configure_logging("warning", "json", stream=buf, lazy=True)
        log = get_logger("dhtnode.test")
        log.info("quiet", n=1)
        print("structlog" in sys.modules, repr(buf.getvalue()))
        log.warning("loud", n=2)
        logging.getLogger("asyncio").warning("from %s", "stdlib")
        logging.getLogger("aioquic").info("filtered")
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        print("structlog" in sys.modules, [(x["event"], x["level"]) for x in lines])
        print(lines[0]["n"], "timestamp" in lines[0])
    """)
    assert out.splitlines() == [
        "False ''",
        "True [('loud', 'warning'), ('from stdlib', 'warning')]",
        "2 True",
    ]


def test_lazy_logging_renders_as_eager_logging() -> None:
    code = """
        import io, json
        from dhtnode.daemon.logging import configure_logging, get_logger
        buf = io.StringIO()
        configure_logging("info", "json", stream=buf, lazy={lazy})
        get_logger("dhtnode.test").info("event", a=1, b="x")
        line = json.loads(buf.getvalue())
        del line["timestamp"]
        print(sorted(line.items()))
    """
    assert run_fresh(code.format(lazy=True)) == run_fresh(code.format(lazy=False))
