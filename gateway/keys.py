"""API keys for the gateway's keys file, which stores only their SHA-256 hashes.

    python -m gateway.keys new --id storefront --scopes gateway,recommender,sentiment [--rate 50 --burst 100]
        prints the new key once (hand it to the client) and the entry to add to the keys file
    python -m gateway.keys new --id shopper-42 --scopes gateway,chat --user u-42
        a key bound to one end user: requests are for that user, whatever their body says
    python -m gateway.keys new --id storefront-backend --scopes gateway,chat,act_as_user
        a trusted service's key: the request body's user id names the user each call is for
    python -m gateway.keys hash KEY
        prints the SHA-256 of an existing key

The keys file (``CBEC_GATEWAY_API_KEYS_FILE``, JSON ``{"keys": [entry, ...]}``) belongs in a Kubernetes
Secret; the gateway re-reads it when it changes.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from .auth import hash_key


def new_key() -> str:
    return "cbec_" + secrets.token_urlsafe(32)


def entry(
    key_id: str,
    key: str,
    scopes: list[str],
    rate: float | None,
    burst: float | None,
    user: str | None = None,
) -> dict[str, object]:
    out: dict[str, object] = {"id": key_id, "sha256": hash_key(key), "scopes": scopes}
    if user:
        out["user"] = user
    if rate is not None:
        out["rate_per_s"] = rate
    if burst is not None:
        out["burst"] = burst
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a key and its keys-file entry")
    new.add_argument("--id", required=True)
    new.add_argument("--scopes", required=True, help="comma-separated, e.g. gateway,recommender or *")
    new.add_argument("--rate", type=float)
    new.add_argument("--burst", type=float)
    new.add_argument("--user", help="bind the key to this end user (its requests are for that user only)")
    hashed = sub.add_parser("hash", help="SHA-256 of a key")
    hashed.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_key(args.key))
        return
    key = new_key()
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    print(f"key (shown once, give it to the client): {key}", file=sys.stderr)
    print(json.dumps(entry(args.id, key, scopes, args.rate, args.burst, args.user)))


if __name__ == "__main__":
    main()
