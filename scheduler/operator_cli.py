"""`sparkgrid operators`: the parties that run workers and are paid for them.

    sparkgrid operators add NAME       a new operator; prints its token once (stored hashed)
    sparkgrid operators rotate NAME    a new token; the old one is refused from now on
    sparkgrid operators revoke NAME    the token is refused at once; its workers get no more jobs
    sparkgrid operators list           operators, their token ids, states and registered workers

Knows: the command's options and messages. Does not know: Redis (the store does).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from scheduler.cli import utc_time
from scheduler.errors import SchedulerError
from sparkgrid.options import add_redis_options, redis_url


def operators_options(p: argparse.ArgumentParser) -> None:
    redis = argparse.ArgumentParser(add_help=False)  # accepted after the action too
    add_redis_options(redis, "operators")
    sub = p.add_subparsers(dest="action", metavar="action", required=True)
    for action, text in (("add", "a new operator; its token is printed once"),
                         ("rotate", "a new token for an operator; the old one stops working"),
                         ("revoke", "refuse the operator's token at once; its workers get no "
                                    "more jobs")):
        sub.add_parser(action, parents=[redis], help=text).add_argument("name")
    listing = sub.add_parser("list", parents=[redis],
                             help="operators, token ids, states, workers (never the tokens)")
    listing.add_argument("--json", action="store_true", help="print JSON")


def run_operators(args) -> int:
    return asyncio.run(_operators(args))


async def _operators(args) -> int:
    from scheduler.redis_store import RedisStore

    store = RedisStore(redis_url(args.redis_url), prefix=args.redis_prefix)
    try:
        if args.action in ("add", "rotate"):
            make = store.add_operator if args.action == "add" else store.rotate_operator
            token = await make(args.name)
            print(f"operator: {args.name}\ntoken:    {token}\n(the token is shown only now; it "
                  "is stored as a hash. Workers use it: SPARKGRID_OPERATOR_TOKEN=<token> "
                  "sparkgrid worker ...)")
        elif args.action == "revoke":
            if not await store.revoke_operator(args.name):
                raise ValueError(f"name: no live operator {args.name!r}")
            print(f"revoked {args.name}: its token is refused, its workers get no more jobs")
        else:
            rows = await store.list_operators()
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                state = (f"revoked {utc_time(row['revoked_at'])}" if row["revoked_at"]
                         else "active")
                print(f"{row['name']:<24} {row['token_id']}  {state:<28} "
                      f"workers: {', '.join(row['workers']) or '(none)'}")
    except SchedulerError as err:
        raise ValueError(str(err)) from None
    finally:
        await store.close()
    return 0


COMMANDS = {"operators": (operators_options, run_operators)}
