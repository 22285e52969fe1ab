"""Public market data: markets, book, ticker, trades (no key needed)."""
from __future__ import annotations

import click

from exchange.client.sync import Client
from exchange.commands.output import Output, cell, table
from exchange.commands.session import api_command
from exchange.markets.schemas import Book


@click.command()
@api_command
def markets(out: Output, api: Client) -> None:
    """Every market with its last and indicative price."""
    out.emit(api.markets(), lambda items: table(items, [
        ("MARKET", lambda m: m.id), ("LAST", lambda m: m.last_price), ("INDICATIVE", lambda m: m.indicative_price),
        ("LAST TRADE", lambda m: m.last_trade_at)]))


def _book_text(book: Book, depth: int) -> str:
    asks = list(reversed(book.asks[:depth]))
    bids = book.bids[:depth]
    lines = [f"{book.market}  seq {book.seq}  as of {cell(book.at)}", f"{'':6}{'PRICE':>12}  {'GPUS':>6}"]
    lines += [f"{'ask':6}{level.price:>12}  {level.gpus:>6}" for level in asks]
    lines.append("-" * 26)
    lines += [f"{'bid':6}{level.price:>12}  {level.gpus:>6}" for level in bids]
    return "\n".join(lines)


@click.command()
@click.argument("market")
@click.option("--depth", default=10, show_default=True, type=click.IntRange(1), help="levels per side in the table")
@api_command
def book(out: Output, api: Client, market: str, depth: int) -> None:
    """MARKET's order book (e.g. H100-80GB/spot): bids by limit, asks (free GPUs) by floor."""
    out.emit(api.book(market), lambda b: _book_text(b, depth))


@click.command()
@click.argument("market")
@api_command
def ticker(out: Output, api: Client, market: str) -> None:
    """MARKET's price, 24 h figures, utilisation and reclaim risk."""
    out.emit(api.ticker(market))


@click.command()
@click.argument("market")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@api_command
def trades(out: Output, api: Client, market: str, limit: int) -> None:
    """MARKET's recent trades."""
    out.emit(api.trades(market, limit=limit), lambda t: table(t.items, [
        ("ID", lambda x: x.id), ("AT", lambda x: x.at), ("PRICE", lambda x: x.price), ("GPUS", lambda x: x.gpus),
        ("DURATION_S", lambda x: x.duration_s), ("GPU_H", lambda x: x.gpu_hours)]))


COMMANDS = [markets, book, ticker, trades]
