"""The DNS wire format through dnslib (the only ``dnslib`` importer).

Everything here is pure and bounded: a packet is checked by its header before it is parsed
(one question, no answer or authority records, at most one additional record: the EDNS OPT
of a query), so no input makes the parser walk more than one name and one option, and anything
dnslib cannot read is None, never an exception. Upstream replies are only looked at through
their header (id, QR, TC) and passed on as they came.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSBuffer, DNSHeader, DNSRecord

# A query bigger than this is refused unread: real queries are well under 512 bytes.
MAX_QUERY = 4096
HEADER_SIZE = 12
# The UDP answer size a client without EDNS can take (RFC 1035 4.2.1).
CLASSIC_UDP = 512
OPCODE_QUERY = 0
TYPE_A = QTYPE.A
TYPE_PTR = QTYPE.PTR
TYPE_ANY = QTYPE.ANY
TYPE_OPT = QTYPE.OPT
REVERSE_SUFFIX = ".in-addr.arpa"


@dataclass(frozen=True, slots=True)
class Query:
    """One standard query as received: its name (lower case, no final dot), type and size
    limit, and the parsed record the answers are built from."""

    id: int
    name: str
    qtype: int
    udp_limit: int
    record: DNSRecord

    @property
    def reverse_address(self) -> str | None:
        """The IPv4 address a ``d.c.b.a.in-addr.arpa`` PTR query asks about, else None."""
        if self.qtype not in (TYPE_PTR, TYPE_ANY) or not self.name.endswith(REVERSE_SUFFIX):
            return None
        octets = self.name[: -len(REVERSE_SUFFIX)].split(".")
        if len(octets) != 4:
            return None
        try:
            return str(ipaddress.IPv4Address(".".join(reversed(octets))))
        except ValueError:
            return None


def header_of(data: bytes) -> DNSHeader | None:
    """A message's header, None when it has none."""
    if len(data) < HEADER_SIZE:
        return None
    try:
        return DNSHeader.parse(DNSBuffer(data[:HEADER_SIZE]))
    except Exception:  # dnslib raises several kinds; none of them is ours to pass on
        return None


def parse_query(data: bytes) -> Query | bytes | None:
    """A standard query; or the answer to send at once to a query we do not take (FORMERR,
    NOTIMP); or None for what is no query at all (dropped without a word: answering garbage
    would make us a reflector)."""
    if len(data) > MAX_QUERY:
        return None
    header = header_of(data)
    if header is None or header.qr:
        return None
    if header.opcode != OPCODE_QUERY:
        return _error_header(header, RCODE.NOTIMP)
    if header.q != 1 or header.a or header.auth or header.ar > 1:
        return _error_header(header, RCODE.FORMERR)
    try:
        record = DNSRecord.parse(data)
        question = record.questions[0]
        name = str(question.qname).rstrip(".").lower()
        qtype = int(question.qtype)
        limit = CLASSIC_UDP
        for extra in record.ar:
            if extra.rtype == TYPE_OPT:
                # The OPT record's class holds the client's UDP payload size (RFC 6891).
                limit = max(CLASSIC_UDP, min(int(extra.rclass), 65535))
    except Exception:  # a malformed name or option: dnslib raises more than DNSError
        return _error_header(header, RCODE.FORMERR)
    return Query(header.id, name, qtype, limit, record)


def _error_header(header: DNSHeader, rcode: int) -> bytes:
    reply = DNSRecord(DNSHeader(id=header.id, bitmap=header.bitmap, qr=1, ra=1, aa=0,
                                rcode=rcode))
    # The bitmap copy carried the query's flags; only these go back.
    reply.header.tc = 0
    reply.header.rcode = rcode
    packed = bytes(reply.pack())
    return packed


def _reply(query: Query) -> DNSRecord:
    return query.record.reply(ra=1, aa=1)


def answer_addresses(query: Query, addresses: tuple[str, ...], ttl: int) -> bytes:
    """The A records of a name we hold (none for other types: the name exists, NODATA)."""
    reply = _reply(query)
    if query.qtype in (TYPE_A, TYPE_ANY):
        for address in addresses:
            reply.add_answer(RR(query.record.q.qname, TYPE_A, rdata=A(address), ttl=ttl))
    return _pack(reply, query)


def answer_pointer(query: Query, name: str, ttl: int) -> bytes:
    """The PTR record of an address we hold."""
    reply = _reply(query)
    reply.add_answer(RR(query.record.q.qname, TYPE_PTR, rdata=PTR(name + "."), ttl=ttl))
    return _pack(reply, query)


def no_such_name(query: Query) -> bytes:
    reply = _reply(query)
    reply.header.rcode = RCODE.NXDOMAIN
    return _pack(reply, query)


def server_failure(query: Query) -> bytes:
    reply = query.record.reply(ra=1, aa=0)
    reply.header.rcode = RCODE.SERVFAIL
    return _pack(reply, query)


def truncated(query: Query) -> bytes:
    """An empty answer with TC set: the client asks again over TCP."""
    reply = query.record.reply(ra=1, aa=0)
    reply.header.tc = 1
    packed = bytes(reply.pack())
    return packed


def _pack(reply: DNSRecord, query: Query) -> bytes:
    packed = bytes(reply.pack())
    # Our own answers are a few records; this only matters for a name held by very many
    # containers, asked over UDP.
    return truncated(query) if len(packed) > query.udp_limit else packed


def with_id(message: bytes, message_id: int) -> bytes:
    """``message`` with its id replaced (the first two bytes of every DNS message)."""
    return message_id.to_bytes(2, "big") + message[2:]


def is_reply_to(message: bytes, message_id: int) -> bool:
    header = header_of(message)
    return header is not None and bool(header.qr) and header.id == message_id


def is_truncated(message: bytes) -> bool:
    header = header_of(message)
    return header is not None and bool(header.tc)


def query_for(name: str, qtype: str = "A", *, message_id: int | None = None) -> bytes:
    """A query message, for the status check and the tests' clients."""
    record = DNSRecord.question(name, qtype)
    if message_id is not None:
        record.header.id = message_id
    packed = bytes(record.pack())
    return packed


@dataclass(frozen=True, slots=True)
class Answer:
    """A reply as a client sees it: rcode name, answers as text, TC."""

    rcode: str
    answers: tuple[str, ...]
    truncated: bool


def read_answer(message: bytes) -> Answer:
    """A reply read whole (status and tests only: replies from us or an upstream we trust)."""
    record = DNSRecord.parse(message)
    return Answer(RCODE.get(record.header.rcode),
                  tuple(str(rr.rdata).rstrip(".") for rr in record.rr),
                  bool(record.header.tc))
