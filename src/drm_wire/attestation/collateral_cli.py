"""``python -m drm_wire.attestation collateral fetch|show``: offline collateral bundles.

``fetch`` asks a PCS/PCCS (:mod:`.pccs`) for everything a verifier needs for one platform
(named by ``--fmspc``, or read from a quote's or RA-TLS certificate's PCK certificate
with ``--quote``) and writes the bundle, the JSON format ``--collateral`` reads
everywhere. ``show`` prints what a bundle holds and its validity window. Exit status: 0
done, 1 the service failed or the bundle does not parse, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from drm_wire.attestation._pck import parse_sgx_extension
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.pccs import CaType, PccsClient, PccsError
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import parse_ratls_certificate
from drm_wire.errors import DrmError

__all__ = ["add_parser", "run"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_parser(commands: Any) -> None:
    """Add ``collateral fetch`` and ``collateral show`` to the CLI's subcommands."""
    collateral = commands.add_parser("collateral", help="fetch or show Intel collateral bundles")
    actions = collateral.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser("fetch", help="fetch a platform's collateral from a PCS/PCCS")
    fetch.add_argument("--pccs-url", required=True, metavar="URL",
                       help="https://host:port of the PCCS, or Intel's PCS")  # fmt: skip
    fetch.add_argument("--pccs-ca", type=Path, metavar="CA.pem",
                       help="verify the service with this CA, not the system's")  # fmt: skip
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--quote", type=Path, metavar="FILE",
                       help="a quote or RA-TLS certificate from the platform")  # fmt: skip
    which.add_argument("--fmspc", metavar="HEX", help="the platform's FMSPC (12 hex digits)")
    fetch.add_argument("--ca", choices=["processor", "platform"],
                       help="the PCK CA (default: from --quote, else processor)")  # fmt: skip
    fetch.add_argument("--out", type=Path, required=True, metavar="FILE", help="bundle to write")
    show = actions.add_parser("show", help="print what a bundle holds and when it is valid")
    show.add_argument("file", type=Path)
    show.add_argument("--at", help="judge validity at this time, ISO 8601 (default: now)")
    show.add_argument("--json", action="store_true", help="machine-readable output")


def _platform_of(path: Path) -> tuple[bytes, CaType]:
    """FMSPC and PCK CA type from the PCK certificate in a quote or RA-TLS certificate."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----") or data[:1] == b"\x30":
        data = parse_ratls_certificate(data).quote
    certs = x509.load_pem_x509_certificates(parse_quote(data).pck_chain_pem.removesuffix(b"\0"))
    extension = parse_sgx_extension(certs[0])
    if extension is None:
        raise ValueError(f"{path}: the PCK certificate has no SGX extension")
    names = certs[1].subject.get_attributes_for_oid(NameOID.COMMON_NAME) if len(certs) > 1 else []
    ca: CaType = "platform" if names and "Platform" in str(names[0].value) else "processor"
    return extension.fmspc, ca


async def _fetch(args: argparse.Namespace, out: TextIO) -> None:
    if args.quote is not None:
        fmspc, ca = _platform_of(args.quote)
    else:
        try:
            fmspc, ca = bytes.fromhex(args.fmspc), "processor"
        except ValueError as exc:
            raise ValueError("--fmspc must be 12 hex digits") from exc
        if len(fmspc) != 6:
            raise ValueError("--fmspc must be 12 hex digits")
    ca = args.ca or ca
    async with PccsClient(args.pccs_url, ca=args.pccs_ca) as pccs:
        bundle = await pccs.fetch_bundle(fmspc, ca=ca)
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(bundle, encoding="utf-8")
    os.replace(temporary, args.out)
    print(f"wrote {args.out}: FMSPC {fmspc.hex().upper()}, PCK CA {ca}", file=out)


def describe(collateral: Collateral, at: datetime) -> dict[str, Any]:
    """What ``show`` prints: each part's window, the bundle's, and whether it is current."""
    info, identity = collateral.tcb_info, collateral.qe_identity

    def window(start: datetime, end: datetime | None) -> dict[str, Any]:
        return {"from": start.isoformat(), "until": None if end is None else end.isoformat()}

    crls = {
        "pck_crl": collateral.pck_crl,
        "root_ca_crl": collateral.root_ca_crl,
    }
    ends = [info.next_update, identity.next_update] + [
        c.next_update_utc for c in crls.values() if c.next_update_utc is not None
    ]
    starts = [info.issue_date, identity.issue_date] + [c.last_update_utc for c in crls.values()]
    start, end = max(starts), min(ends)
    pck_ca = collateral.pck_crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "fmspc": info.fmspc.hex().upper(),
        "pce_id": info.pce_id.hex().upper(),
        "tcb_evaluation_data_number": info.tcb_evaluation_data_number,
        "tcb_levels": [
            {"status": level.status.value, "advisory_ids": list(level.advisory_ids)}
            for level in info.tcb_levels
        ],
        "tcb_info": window(info.issue_date, info.next_update),
        "qe_identity": window(identity.issue_date, identity.next_update),
        "pck_crl": window(collateral.pck_crl.last_update_utc, collateral.pck_crl.next_update_utc)
        | {"issuer": str(pck_ca[0].value) if pck_ca else "?"},
        "root_ca_crl": window(
            collateral.root_ca_crl.last_update_utc, collateral.root_ca_crl.next_update_utc
        ),
        "valid": window(start, end),
        "at": at.isoformat(),
        "current": start <= at <= end,
    }


def _show(args: argparse.Namespace, out: TextIO) -> bool:
    collateral = Collateral.from_json(args.file.read_bytes())
    at = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    report = describe(collateral, at if at.tzinfo else at.replace(tzinfo=UTC))
    if args.json:
        json.dump(report, out, indent=2)
        print(file=out)
    else:
        for key, value in report.items():
            print(f"{key}: {value}", file=out)
    return bool(report["current"])


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``collateral fetch`` or ``collateral show``; return the exit status."""
    try:
        if args.action == "fetch":
            trio.run(_fetch, args, out)
            return EXIT_OK
        return EXIT_OK if _show(args, out) else EXIT_FAILED
    except PccsError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILED
    except DrmError as exc:  # a bundle or quote that does not parse
        print(f"error: {exc}", file=err)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
