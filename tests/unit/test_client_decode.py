"""The client decodes answers with the server's structs, and still reads an answer from a newer
server that carries fields it does not know (exchange/client/aio.py: decode)."""
from __future__ import annotations

import msgspec
import pytest

from exchange.accounts.schemas import Balance, LedgerEntry, LedgerPage
from exchange.client.aio import _decode_lease_view, decode
from exchange.leases.schemas import Lease, LeaseList, OwnerLease, OwnerLeaseList

ENTRY = (b'{"id":1,"transfer_id":2,"kind":"deposit","book":"available","amount":"1.00","ref_type":null,'
         b'"ref_id":null,"memo":null,"created_at":"2026-01-01T00:00:00Z"')
OWNER_LEASE = (b'{"id":7,"market":"H100-80GB/spot","tier":"spot","host_id":1,"offer_id":2,"gpus":2,'
               b'"gpu_uuids":["GPU-1"],"price":"1.00","start_at":"2026-01-01T00:00:00Z",'
               b'"planned_end_at":"2026-01-01T01:00:00Z","end_at":null,"status":"active","end_reason":null,'
               b'"metered_gpu_hours":"0","billed_gpu_hours":"0","charged":"0.00","fees":"0.00",'
               b'"energy_kwh":"0","settled_at":null')
TENANT_LEASE = OWNER_LEASE + b',"bid_id":3,"limit_price":"2.00","hold":"4.00"'


def test_an_answer_of_the_same_version_is_the_servers_own_struct() -> None:
    balance = decode(b'{"available":"1.00","held":"0.00"}', Balance)

    assert type(balance) is Balance and balance == Balance(available="1.00", held="0.00")


def test_fields_a_newer_server_added_are_ignored_even_nested() -> None:
    page = decode(b'{"items":[' + ENTRY + b',"new_field":1}],"next":null,"total":9}', LedgerPage)

    assert isinstance(page, LedgerPage) and isinstance(page.items[0], LedgerEntry)
    assert page.items[0].amount == "1.00" and page.next is None


def test_a_missing_or_mistyped_field_still_fails() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"available":"1.00"}', Balance)
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"available":"1.00","held":5,"new_field":1}', Balance)


@pytest.mark.parametrize("extra", [b"", b',"new_field":1'])
def test_a_lease_decodes_in_the_view_the_server_sent(extra: bytes) -> None:
    tenant = _decode_lease_view(TENANT_LEASE + extra + b"}", Lease, OwnerLease)
    owner = _decode_lease_view(OWNER_LEASE + extra + b"}", Lease, OwnerLease)
    owners = _decode_lease_view(b'{"items":[' + OWNER_LEASE + extra + b'}],"next":null}', LeaseList, OwnerLeaseList)

    assert isinstance(tenant, Lease) and tenant.bid_id == 3
    assert isinstance(owner, OwnerLease) and not isinstance(owner, Lease)
    assert isinstance(owners, OwnerLeaseList) and not isinstance(owners.items[0], Lease)


def test_a_status_a_newer_server_added_is_read_as_a_plain_string() -> None:
    """The host agent leaves a lease in a status it does not know alone (agents/runner.py
    LEASE_PHASES); for that it must be able to read the lease at all."""
    unknown = OWNER_LEASE.replace(b'"status":"active"', b'"status":"paused"')
    page = decode(b'{"items":[' + unknown + b'}],"next":null}', OwnerLeaseList)
    tenant = _decode_lease_view(unknown + b',"bid_id":3,"limit_price":"2.00","hold":"4.00"}', Lease, OwnerLease)
    owner = _decode_lease_view(unknown + b"}", Lease, OwnerLease)

    assert isinstance(page.items[0], OwnerLease) and page.items[0].status == "paused"
    assert isinstance(tenant, Lease) and tenant.status == "paused"
    assert isinstance(owner, OwnerLease) and not isinstance(owner, Lease) and owner.status == "paused"
    with pytest.raises(msgspec.ValidationError):  # a mistyped value still fails
        decode(OWNER_LEASE.replace(b'"status":"active"', b'"status":5') + b"}", OwnerLease)
