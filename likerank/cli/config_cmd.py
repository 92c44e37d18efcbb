"""``likerank config show`` and ``likerank tables``: what is configured, what is stored."""

from __future__ import annotations

import argparse

from pipeline.core.config import Config, describe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    show = csub.add_parser("show", help="print every value and where it came from")
    show.add_argument("--docs", action="store_true", help="also print each field's documentation")
    show.add_argument("--toml", action="store_true", help="print as plain TOML (no origins)")
    show.set_defaults(handler=show_config)

    t = sub.add_parser("tables", help="list the tables, their columns and where they live")
    t.add_argument("--markdown", action="store_true", help="the README reference, as Markdown")
    t.set_defaults(handler=show_tables)


def show_config(args: argparse.Namespace, cfg: Config) -> int:
    print(cfg.to_toml() if args.toml else describe(cfg, docs=args.docs))
    return 0


def show_tables(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.core.schemas import TABLES
    from pipeline.core.storage import open_storage
    from pipeline.core.tables import list_partitions, markdown_reference

    if args.markdown:
        print(markdown_reference())
        return 0
    storage = open_storage(cfg.storage)
    for t in TABLES.values():
        parts = list_partitions(storage, t.name)
        print(f"{t.name:<11} {storage.uri(t.path)}  ({len(parts)} partition(s), {len(t.schema)} columns)")
    return 0
