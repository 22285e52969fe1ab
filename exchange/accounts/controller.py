from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from exchange.accounts import service
from exchange.accounts.schemas import Account, AccountCreate, AccountCreated, Balance, Deposit, DepositCreate, LedgerPage
from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext

ANY_ACCOUNT = ("admin", "owner", "tenant", "trader")


class AccountController(Controller):
    path = "/v1/accounts"
    tags = ["accounts"]

    @post("/", guards=[requires("admin")], status_code=201)
    async def create(self, ctx: AppContext, data: AccountCreate) -> AccountCreated:
        return await service.create_account(ctx, data)

    @post("/{account_id:int}/deposits", guards=[requires("admin")], status_code=201)
    async def deposit(self, ctx: AppContext, account_id: PathId, data: DepositCreate) -> Response[Deposit]:
        result, replayed = await service.deposit(ctx, account_id, data)
        return Response(result, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @get("/me", guards=[requires(*ANY_ACCOUNT)])
    async def me(self, ctx: AppContext, request: Request) -> Account:
        return await service.get_account(ctx, request.user.account_id)

    @get("/me/balance", guards=[requires(*ANY_ACCOUNT)])
    async def balance(self, ctx: AppContext, request: Request) -> Balance:
        return await service.balance(ctx, request.user.account_id)

    @get("/me/ledger", guards=[requires(*ANY_ACCOUNT)])
    async def ledger(self, ctx: AppContext, request: Request, cursor: str | None = None,
                     limit: Annotated[int, Parameter(ge=1, le=500)] = 100) -> LedgerPage:
        return await service.ledger_page(ctx, request.user.account_id, cursor, limit)

    @get("/{account_id:int}/balance", guards=[requires("admin")])
    async def balance_of(self, ctx: AppContext, account_id: PathId) -> Balance:
        await service.get_account(ctx, account_id)
        return await service.balance(ctx, account_id)
