"""``python -m drm_wire.attestation inspect``: look inside a quote or RA-TLS certificate
(and ``collateral fetch|show``, in :mod:`.collateral_cli`).

For operators and for debugging a refused handshake: it prints the measurements, the key
binding, the PCK chain, the TCB status and a verdict, using exactly the verification code
the daemons use. Exit status: 0 accepted, 1 refused (evidence or policy), 2 bad usage or an
unreadable input, policy or collateral.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.x509.oid import NameOID

from drm_wire.attestation import collateral_cli
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import with_stapled
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import RatlsEvidence, parse_ratls_certificate
from drm_wire.attestation.verify import TrustAnchors, verify_quote
from drm_wire.errors import AttestationError, ConfigError

__all__ = ["main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m drm_wire.attestation")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show and verify a quote or RA-TLS certificate")
    inspect.add_argument("file", type=Path, help="raw quote, or certificate (PEM or DER)")
    inspect.add_argument("--policy", type=Path, help="policy TOML to check against")
    inspect.add_argument("--collateral", type=Path,
                         help="Intel collateral bundle (collateral fetch, or dcap-qvl JSON); "
                         "collateral stapled in a certificate is used too")  # fmt: skip
    inspect.add_argument("--at", help="verification time, ISO 8601 (default: now; naive = UTC)")
    inspect.add_argument("--trust-simulation-root", type=Path, metavar="PEM",
                         help="also trust this INSECURE simulation root")  # fmt: skip
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    collateral_cli.add_parser(commands)
    return parser


def _error(exc: Exception) -> dict[str, str]:
    return {
        "class": type(exc).__name__,
        "check": str(getattr(exc, "check", "")),
        "message": str(exc),
    }


def _chain(pem: bytes) -> list[str]:
    try:
        certs = x509.load_pem_x509_certificates(pem.removesuffix(b"\0"))
    except ValueError:
        return ["<unparsable chain>"]
    names = []
    for cert in certs:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        names.append(str(cn[0].value) if cn else cert.subject.rfc4514_string())
    return names


def _describe(quote: bytes, carrier: str) -> dict[str, Any]:
    parsed = parse_quote(quote)
    body = parsed.body
    return {
        "carrier": carrier,
        "version": parsed.header.version,
        "qe_vendor_id": parsed.header.qe_vendor_id.hex(),
        "mr_enclave": body.mr_enclave.hex(),
        "mr_signer": body.mr_signer.hex(),
        "isv_prod_id": body.isv_prod_id,
        "isv_svn": body.isv_svn,
        "attributes_flags": f"{body.attributes_flags:#x}",
        "attributes_xfrm": f"{body.attributes_xfrm:#x}",
        "misc_select": f"{body.misc_select:#x}",
        "debug": body.debug,
        "report_data": body.report_data.hex(),
        "pck_chain": _chain(parsed.pck_chain_pem),
    }


def _load(args: argparse.Namespace) -> tuple[bytes, Policy | None, Collateral | None, datetime]:
    data = args.file.read_bytes()
    policy = Policy.load(args.policy) if args.policy else None
    collateral = Collateral.from_json(args.collateral.read_bytes()) if args.collateral else None
    now = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    return data, policy, collateral, now if now.tzinfo else now.replace(tzinfo=UTC)


def _inspect(args: argparse.Namespace, report: dict[str, Any]) -> bool:
    data, policy, collateral, now = _load(args)
    report["at"] = now.isoformat()
    sim_root = None
    if args.trust_simulation_root:
        sim_root = TrustAnchors.with_simulation_root(args.trust_simulation_root).simulation_root
    elif policy is not None:
        sim_root = policy.simulation_root
    trust = TrustAnchors(simulation_root=sim_root)
    quotes: list[tuple[bytes, str]]
    evidence: RatlsEvidence | None = None
    if data.lstrip().startswith(b"-----") or data[:1] == b"\x30":
        report["kind"] = "ratls-certificate"
        evidence = parse_ratls_certificate(data)
        report["key_binding"] = {
            "bound": True,
            "pubkey_hash_alg": evidence.claims.hash_alg if evidence.claims else None,
            "legacy_carrier": evidence.legacy_carrier,
        }
        quotes = [(q, "tcg") for q in (evidence.tcg_quote,) if q is not None]
        quotes += [(q, evidence.legacy_carrier or "legacy") for q in (evidence.legacy_quote,) if q]
    else:
        report["kind"] = "quote"
        quotes = [(data, "raw")]
    report["quotes"] = [_describe(quote, carrier) for quote, carrier in quotes]
    for entry, (quote, _) in zip(report["quotes"], quotes, strict=True):
        source = with_stapled(collateral, evidence.stapled_collateral if evidence else None)
        verified = verify_quote(quote, trust=trust, collateral=source, now=now)
        entry["signatures"] = "verified"
        entry["simulated"] = verified.simulated
        entry["tcb_status"] = verified.tcb_status.value if verified.tcb_status else None
        entry["advisory_ids"] = list(verified.advisory_ids)
        if policy is not None:
            spki = evidence.spki_der if evidence else None
            policy.check(verified, public_key_spki=spki)
            entry["policy"] = "accepted"
    return True


def _print_text(report: dict[str, Any], out: TextIO) -> None:
    for key, value in report.items():
        if key == "quotes":
            for entry in value:
                print(f"quote ({entry['carrier']}):", file=out)
                for name, item in entry.items():
                    if name != "carrier":
                        print(f"  {name}: {item}", file=out)
        elif isinstance(value, dict):
            print(f"{key}:", file=out)
            for name, item in value.items():
                print(f"  {name}: {item}", file=out)
        else:
            print(f"{key}: {value}", file=out)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status instead of exiting (tests call this)."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    if args.command == "collateral":
        return collateral_cli.run(args, out, sys.stderr)
    report: dict[str, Any] = {"file": str(args.file)}
    if args.policy:
        report["policy"] = str(args.policy)
    status = EXIT_OK
    try:
        _inspect(args, report)
        report["verdict"] = "accepted" if args.policy else "signatures verified (no policy given)"
    except AttestationError as exc:
        report["verdict"] = "refused"
        report["error"] = _error(exc)
        status = EXIT_REFUSED
    except (ConfigError, OSError, ValueError) as exc:  # unreadable file, bad --at, bad policy
        report["verdict"] = "error"
        report["error"] = _error(exc)
        status = EXIT_USAGE
    if args.json:
        json.dump(report, out, indent=2)
        print(file=out)
    else:
        _print_text(report, out)
    return status
