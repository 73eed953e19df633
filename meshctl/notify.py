"""``meshctl notify``: publish to a channel, follow channels, see who is present.

    meshctl notify publish CHANNEL DATA      publish; prints the offset and epoch
    meshctl notify tail CHANNEL... [--since OFFSET@EPOCH] [--count N] [--pattern P]
                                             follow channels (Ctrl-C stops)
    meshctl notify presence CHANNEL          the clients present
"""

from __future__ import annotations

import time

import click

from clients import ChannelState, InboxItem, Mesh, Position, PresenceEvent, Publication
from clients.notify_types import NotifyItem
from meshctl import output
from meshctl.context import run, settings


def format_item(item: NotifyItem) -> str:
    """One line per item a subscription yields."""
    if isinstance(item, Publication):
        return f"{item.channel} #{item.offset}@{item.epoch}: {_text(item.data)}"
    if isinstance(item, InboxItem):
        return f"inbox {item.user} #{item.cursor}: {_text(item.data)}"
    if isinstance(item, PresenceEvent):
        what = "joined" if item.joined else "left (expired)" if item.expired else "left"
        return f"{item.channel}: {item.member.client_id} {what}"
    assert isinstance(item, ChannelState)
    if item.recovered:
        return f"{item.channel or item.inbox}: from #{item.offset}@{item.epoch}"
    return (f"{item.channel or item.inbox}: NOT RECOVERED, history starts at "
            f"#{item.earliest_offset}@{item.epoch}")


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return repr(data)


def _position(since: str) -> Position:
    offset, _, epoch = since.partition("@")
    if not offset.isdigit():
        raise click.BadParameter("OFFSET@EPOCH, e.g. 12@1.a", param_hint="--since")
    return Position(int(offset), epoch)


@click.group("notify")
def notify_group() -> None:
    """Notifications: publish, tail channels, presence."""


@notify_group.command("publish")
@click.argument("channel")
@click.argument("data")
def publish(channel: str, data: str) -> int:
    """Publish DATA (text) to CHANNEL."""
    async def go() -> int:
        async with settings().mesh() as mesh:
            published = await mesh.notify.publish(channel, data)
        if settings().json:
            output.emit(published)
        else:
            print(f"{channel} #{published.offset}@{published.epoch}")
        return output.OK

    return run(go())


@notify_group.command("tail")
@click.argument("channels", nargs=-1)
@click.option("--since", "since", default=None, metavar="OFFSET@EPOCH",
              help="Resume after this position (one channel only); default: from now.")
@click.option("--pattern", "patterns", multiple=True,
              help="Also follow every channel matching this (e.g. 'orders.*').")
@click.option("--count", type=int, default=0, help="Stop after this many items (0: never).")
@click.option("--states", is_flag=True, help="Show where every channel starts.")
def tail(channels: tuple[str, ...], since: str | None, patterns: tuple[str, ...],
         count: int, states: bool) -> int:
    """Follow CHANNELS (and --pattern matches) as they are published to."""
    if since is not None and len(channels) != 1:
        raise click.UsageError("--since needs exactly one channel")
    if not channels and not patterns:
        raise click.UsageError("give a channel or a --pattern")
    wanted = {c: (_position(since) if since is not None else None) for c in channels}

    async def go(mesh: Mesh) -> int:
        seen = 0
        async with mesh.notify.subscribe(wanted, patterns=patterns,
                                         include_states=states) as sub:
            async for item in sub:
                if settings().json:
                    output.emit({"kind": type(item).__name__, **output.to_jsonable(item)})
                else:
                    print(format_item(item), flush=True)
                seen += 1
                if count and seen >= count:
                    break
        return output.OK

    async def with_mesh() -> int:
        async with settings().mesh() as mesh:
            return await go(mesh)

    return run(with_mesh())


@notify_group.command("presence")
@click.argument("channel")
def presence(channel: str) -> int:
    """The clients present in CHANNEL."""
    async def go() -> int:
        async with settings().mesh() as mesh:
            members = await mesh.notify.presence(channel)
        if settings().json:
            output.emit({"channel": channel, "members": members})
            return output.OK
        now = time.time()
        print(f"{len(members)} client(s) in {channel!r}")
        for m in members:
            print(f"  {m.client_id:24} user {m.user or '-':12} "
                  f"expires in {m.expire_time - now:.1f}s")
        return output.OK

    return run(go())
