"""SQLAlchemy 2 typed models: the durable state of Coilroom.

Every table here is created by the alembic migrations in ``storage/migrations``;
``tests/test_migrations.py`` fails when the two drift apart.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names so migrations read the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UserRole(enum.StrEnum):
    ADMIN = "admin"
    COORDINATOR = "coordinator"
    INSTRUCTOR = "instructor"


class MemberRole(enum.StrEnum):
    COORDINATOR = "coordinator"
    INSTRUCTOR = "instructor"
    OBSERVER = "observer"


class Stage(enum.StrEnum):
    """A partnership's life, in order; ``renewed``, ``completed`` and ``closed`` end it."""

    PLANNING = "planning"
    PARTNER_IDENTIFIED = "partner_identified"
    INVITED = "invited"
    MEETING = "meeting"
    NEGOTIATING = "negotiating"
    AGREEMENT_SIGNED = "agreement_signed"
    ACTIVE = "active"
    REVIEW = "review"
    RENEWED = "renewed"
    COMPLETED = "completed"
    CLOSED = "closed"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native ENUM type): adding a value needs no DDL.
    return Enum(
        e,
        name=name,
        native_enum=False,
        length=32,
        values_callable=lambda x: [m.value for m in x],
    )


class Institution(Base):
    __tablename__ = "institutions"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    country: Mapped[str] = mapped_column(String(2))  # ISO 3166-1 alpha-2
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)  # stored lower-cased
    name: Mapped[str] = mapped_column(String(200))
    institution_id: Mapped[int | None] = mapped_column(
        ForeignKey("institutions.id", ondelete="SET NULL")
    )
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    password_hash: Mapped[str] = mapped_column(String(200))
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Session(Base):
    """A browser login. Only a SHA-256 of the cookie value is stored."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Partnership(Base):
    __tablename__ = "partnerships"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    goals: Mapped[str] = mapped_column(Text, default="")
    stage: Mapped[Stage] = mapped_column(_enum(Stage, "stage"), default=Stage.PLANNING)
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PartnershipInstitution(Base):
    __tablename__ = "partnership_institutions"
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), primary_key=True
    )
    institution_id: Mapped[int] = mapped_column(
        ForeignKey("institutions.id", ondelete="RESTRICT"), primary_key=True
    )


class StageChange(Base):
    """Every stage a partnership passed through, with who moved it and when."""

    __tablename__ = "stage_changes"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), index=True
    )
    from_stage: Mapped[Stage | None] = mapped_column(_enum(Stage, "stage"))
    to_stage: Mapped[Stage] = mapped_column(_enum(Stage, "stage"))
    changed_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")


class Agreement(Base):
    """The MOU or MOA of a partnership (its activities live in the room's document)."""

    __tablename__ = "agreements"
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(3), default="MOU")  # MOU | MOA
    status: Mapped[str] = mapped_column(String(16), default="draft")
    valid_from: Mapped[dt.date | None] = mapped_column(Date)
    valid_to: Mapped[dt.date | None] = mapped_column(Date)
    # [{name, title, institution_id, signed_on}]
    signatories: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    funding_terms: Mapped[str] = mapped_column(Text, default="")
    updated_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Membership(Base):
    __tablename__ = "memberships"
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[MemberRole] = mapped_column(_enum(MemberRole, "member_role"))
    last_read_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Invitation(Base):
    """A single-use, expiring invitation; only a SHA-256 of its code is stored."""

    __tablename__ = "invitations"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[MemberRole] = mapped_column(_enum(MemberRole, "member_role"))
    institution_id: Mapped[int | None] = mapped_column(
        ForeignKey("institutions.id", ondelete="SET NULL")
    )
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    accepted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    accepted_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Room(Base):
    __tablename__ = "rooms"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    partnership_id: Mapped[int] = mapped_column(
        ForeignKey("partnerships.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    # Counters handed out under the row lock of this row: gap-free per room, even
    # with writers in several processes.
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_edit: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (
        UniqueConstraint("room_id", "seq"),
        UniqueConstraint("room_id", "author_id", "client_id"),
        Index("ix_chat_messages_room_edit", "room_id", "edit_seq"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    author_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    client_id: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    edited_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The room's edit counter when this message was last edited or deleted, so a
    # reconnecting client learns of changes to messages it had already seen.
    edit_seq: Mapped[int | None] = mapped_column(BigInteger)


class ActivityEvent(Base):
    """The append-only log that dashboards aggregate."""

    __tablename__ = "activity_events"
    __table_args__ = (Index("ix_activity_events_room_at", "room_id", "at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    room_id: Mapped[int | None] = mapped_column(
        ForeignKey("rooms.id", ondelete="CASCADE")
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    kind: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Document(Base):
    """A CRDT document of a room (``agreement`` and free-form names)."""

    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("room_id", "name"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DocumentUpdate(Base):
    """The append-only log of Yjs updates; compaction folds old rows into the snapshot."""

    __tablename__ = "document_updates"
    __table_args__ = (Index("ix_document_updates_doc_id", "document_id", "id"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE")
    )
    data: Mapped[bytes] = mapped_column(LargeBinary)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DocumentSnapshot(Base):
    """The document's state up to and including update ``upto_update_id``."""

    __tablename__ = "document_snapshots"
    document_id: Mapped[int] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[bytes] = mapped_column(LargeBinary)
    upto_update_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DocumentVersion(Base):
    """A named version ("as signed on 2026-03-01"): the full state at that moment."""

    __tablename__ = "document_versions"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ActivityRow(Base):
    """One activity of a room's ``agreement`` document, projected for SQL readers."""

    __tablename__ = "activities"
    room_id: Mapped[int] = mapped_column(
        ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True
    )
    activity_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="planned")
    owner_id: Mapped[int | None] = mapped_column(BigInteger)
    people: Mapped[list[Any]] = mapped_column(JSON, default=list)
    institutions: Mapped[list[Any]] = mapped_column(JSON, default=list)
    starts_on: Mapped[dt.date | None] = mapped_column(Date)
    ends_on: Mapped[dt.date | None] = mapped_column(Date)
    outcomes: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CallSession(Base):
    """One call in a room, from its first participant joining to its last leaving."""

    __tablename__ = "call_sessions"
    __table_args__ = (
        Index("ix_call_sessions_room_started", "room_id", "started_at"),
        # Live calls only: what the sweeps for records left open look through.
        Index(
            "ix_call_sessions_open",
            "room_id",
            postgresql_where=text("ended_at IS NULL"),
            sqlite_where=text("ended_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"))
    started_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # NULL while the call is live (a dead process's are closed by the sweeps).
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class CallParticipant(Base):
    """One connection's stay in a call: who, from when to when, which media it used."""

    __tablename__ = "call_participants"
    __table_args__ = (
        # Open stays only: what the sweeps for records left open look through.
        Index(
            "ix_call_participants_open",
            "call_id",
            postgresql_where=text("left_at IS NULL"),
            sqlite_where=text("left_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    call_id: Mapped[int] = mapped_column(
        ForeignKey("call_sessions.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    connection_id: Mapped[str] = mapped_column(String(64))
    joined_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    left_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Whether the microphone, camera or screen share was on at any time.
    audio: Mapped[bool] = mapped_column(default=False)
    video: Mapped[bool] = mapped_column(default=False)
    screen: Mapped[bool] = mapped_column(default=False)
    # left | disconnected | removed | ended (the server closed the call)
    left_reason: Mapped[str | None] = mapped_column(String(16))
