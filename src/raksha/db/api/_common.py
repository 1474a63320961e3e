"""What every query shares: tenant scoping, soft deletion, pagination, and status changes by compare-and-set."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Select, and_, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import ExecutableOption

from raksha.db.models import Base
from raksha.db.types import utcnow
from raksha.domain.errors import InvalidInput, NotFound, StatusChanged
from raksha.domain.states import StateMachine

M = TypeVar("M", bound=Base)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SORT_DIRS = ("asc", "desc")

# Columns no update may touch: identity, tenancy, timestamps and soft deletion are the layer's own.
_NEVER_UPDATED = frozenset({"id", "project_id", "user_id", "created_at", "updated_at", "deleted", "deleted_at",
                            "status"})


def live(model: type[Base], project_id: str | None) -> list[Any]:
    """WHERE clauses of a tenant's rows that are not deleted."""
    col = getattr(model, "project_id")  # noqa: B009 - every tenant-owned model has one
    return [col.is_(None) if project_id is None else col == project_id, model.deleted.is_(False)]


def get_one(session: Session, model: type[M], project_id: str | None, obj_id: str, *,
            options: Iterable[ExecutableOption] = (), what: str) -> M:
    """The tenant's live row ``obj_id``; NotFound (``<WHAT>_NOT_FOUND``) if it is absent, deleted or another's."""
    stmt = select(model).where(model.id == obj_id, *live(model, project_id)).options(*options)
    row = session.execute(stmt.execution_options(populate_existing=True)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no {what} {obj_id!r}", code=f"{what.upper().replace(' ', '_')}_NOT_FOUND", id=obj_id)
    return row


def check_page(limit: int | None, offset: int | None, sort_dir: str) -> None:
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1..{MAX_LIMIT}, not {limit}", code="QUERY_INVALID", field="limit")
    if offset is not None and offset < 0:
        raise InvalidInput(f"offset must be >= 0, not {offset}", code="QUERY_INVALID", field="offset")
    if sort_dir not in SORT_DIRS:
        raise InvalidInput(f"sort_dir must be asc or desc, not {sort_dir!r}", code="QUERY_INVALID", field="sort_dir")


def page(session: Session, model: type[M], stmt: Select[Any], *, limit: int | None, marker: str | None,
         offset: int | None, sort_dir: str) -> list[M]:
    """One page of ``stmt`` sorted by ``created_at`` then ``id``; ``marker`` is the last id of the previous page.

    The marker must itself be a row ``stmt`` selects (the same tenant and filters), or the
    request is refused (``MARKER_INVALID``): a marker never reveals anything of another tenant.
    """
    check_page(limit, offset, sort_dir)
    created, ident = model.created_at, model.id
    if marker is not None:
        marker_stmt = stmt.with_only_columns(created).where(ident == marker).order_by(None)
        marker_created = session.execute(marker_stmt).scalar_one_or_none()
        if marker_created is None:
            raise InvalidInput(f"marker {marker!r} is not an item of this list", code="MARKER_INVALID",
                               field="marker")
        if sort_dir == "desc":
            after = or_(created < marker_created, and_(created == marker_created, ident < marker))
        else:
            after = or_(created > marker_created, and_(created == marker_created, ident > marker))
        stmt = stmt.where(after)
    order = (created.desc(), ident.desc()) if sort_dir == "desc" else (created.asc(), ident.asc())
    stmt = stmt.order_by(*order).limit(limit if limit is not None else DEFAULT_LIMIT)
    if offset:
        stmt = stmt.offset(offset)
    return list(session.execute(stmt).scalars().unique())


def checked_values(values: Mapping[str, Any], allowed: Collection[str], what: str) -> dict[str, Any]:
    """``values`` if every key is an updatable column of ``what``; status never (it moves by transition)."""
    bad = sorted(k for k in values if k in _NEVER_UPDATED or k not in allowed)
    if bad:
        hint = " (status changes only through the transition functions)" if "status" in bad else ""
        raise InvalidInput(f"cannot set {', '.join(bad)} of a {what}{hint}", code="FIELD_NOT_UPDATABLE",
                           fields=bad)
    return dict(values)


def columns_of(model: type[Base]) -> frozenset[str]:
    return frozenset(c.key for c in model.__mapper__.column_attrs) - _NEVER_UPDATED


def update_row(session: Session, model: type[M], project_id: str | None, obj_id: str, values: Mapping[str, Any], *,
               allowed: Collection[str], what: str, options: Iterable[ExecutableOption] = ()) -> M:
    """Set updatable columns of the tenant's live row; returns it (with ``options`` loaded)."""
    vals = checked_values(values, allowed, what)
    row = get_one(session, model, project_id, obj_id, what=what, options=options)
    for key, value in vals.items():
        setattr(row, key, value)
    if vals:
        row.updated_at = utcnow()
        session.flush()
    return row


def transition(session: Session, model: type[M], machine: StateMachine, project_id: str, obj_id: str, new: str,
               *, expected: str | Collection[str] | None, values: Mapping[str, Any], allowed: Collection[str],
               what: str, own_values: Mapping[str, Any] | None = None) -> str:
    """Move ``obj_id`` to ``new`` if its machine allows it, by compare-and-set on the status read.

    ``expected``: the status (or statuses) the caller believes it is in; anything else is
    ``STATUS_CHANGED``. Another worker moving the row between the read and the update is
    ``STATUS_CHANGED`` too, and nothing is written. Returns the status it left.
    ``values`` are the caller's (checked against ``allowed``); ``own_values`` this layer's.
    """
    vals = checked_values(values, allowed, what)
    vals.update(own_values or {})  # the layer's own (soft deletion), not the caller's
    status_col = getattr(model, "status")  # noqa: B009
    current = session.execute(
        select(status_col).where(model.id == obj_id, *live(model, project_id))).scalar_one_or_none()
    if current is None:
        raise NotFound(f"no {what} {obj_id!r}", code=f"{what.upper().replace(' ', '_')}_NOT_FOUND", id=obj_id)
    if expected is not None:
        wanted = {expected} if isinstance(expected, str) else set(expected)
        if current not in wanted:
            raise StatusChanged(f"{what} {obj_id} is {current}, not {' or '.join(sorted(wanted))}",
                                id=obj_id, status=current, expected=sorted(wanted))
    machine.check(current, new, resource_id=obj_id)
    vals.update(status=new, updated_at=utcnow())
    result = session.execute(
        update(model).where(model.id == obj_id, status_col == current, *live(model, project_id)).values(**vals)
        .execution_options(synchronize_session=False))
    if cast(CursorResult[Any], result).rowcount != 1:
        now = session.execute(select(status_col).where(model.id == obj_id)).scalar_one_or_none()
        raise StatusChanged(f"{what} {obj_id} changed from {current} to {now} while moving it to {new}",
                            id=obj_id, status=now, requested=new)
    return str(current)
