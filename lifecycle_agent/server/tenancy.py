"""One tenant's view of the service: public agent ids in, views in public ids out.

A tenant's agent ``support-bot`` is stored as ``<tag>:support-bot`` (see :mod:`.auth`). This
module is the only place that translates between the two: it turns a caller's id into an
:class:`AgentRef`, checks that the caller owns the agent, and words every answer and every
refusal in the caller's ids. It raises domain errors (:mod:`lifecycle_agent.errors` and
the server's own, below), never HTTP ones: the app maps them to statuses in one table.

Methods named ``*_now`` read the store and must run on the store's thread (through
:meth:`AgentService.db`); the others are async and make the trips to that thread themselves,
each checking ownership in the same trip as its read, so a read costs one trip.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import (
    AgentExistsError,
    AgentNotFoundError,
    ContextFormatError,
    FeedbackConflictError,
    LifecycleAgentError,
    VersionNotFoundError,
)
from ..models.base import Generation
from ..settings import AgentSettings
from ..store import AgentInfo, ContextVersion, EpisodeRow, Store
from .auth import Tenant
from .service import AgentService


# ---------------------------------------------------------------------------------------- domain errors


class AgentIdError(LifecycleAgentError, ValueError):
    """An agent id this tenant cannot use (the store's rules, or too long with the tenant's prefix)."""


class CompletionNotFoundError(LifecycleAgentError, KeyError):
    """No completion with this id among the agent's solve episodes."""

    def __str__(self) -> str:
        return str(self.args[0])


class EpisodeNotFoundError(LifecycleAgentError, KeyError):
    """No episode with this id among the agent's episodes."""

    def __str__(self) -> str:
        return str(self.args[0])


class FeedbackNotAppliedError(LifecycleAgentError):
    """A feedback's update episode did not land; the completion stays unrated, so it can be sent again.

    ``context_version`` is the agent's current version (unchanged by this feedback).
    """

    def __init__(self, message: str, *, context_version: Optional[int]):
        super().__init__(message)
        self.context_version = context_version


class AlreadyRatedError(FeedbackNotAppliedError, FeedbackConflictError):
    """The completion already has its feedback."""


class UpdateConflictError(FeedbackNotAppliedError):
    """The context changed while the update episode ran (another process writes to the database)."""


class UpdateFailedError(FeedbackNotAppliedError):
    """The update episode's model call failed."""


class UpdateTimedOutError(UpdateFailedError):
    """The update episode's model call took longer than the server's model timeout."""


# ---------------------------------------------------------------------------------------- ids and views


@dataclass(frozen=True)
class AgentRef:
    """One agent as a caller names it: the public id and the stored id it stands for."""

    public_id: str
    stored_id: str

    def in_public_ids(self, text: str, *others: "AgentRef") -> str:
        """``text`` (a store message) with stored ids replaced by the caller's."""
        for ref in (self, *others):
            text = text.replace(ref.stored_id, ref.public_id)
        return text


def agent_ref(tenant: Tenant, public_id: str) -> AgentRef:
    try:
        return AgentRef(public_id, tenant.stored_id(public_id))
    except ValueError as exc:
        raise AgentIdError(str(exc)) from None


def agent_view(tenant: Tenant, info: AgentInfo) -> dict[str, Any]:
    return {
        "agent_id": tenant.public_id(info.agent_id), "created_at": info.created_at,
        "context_version": info.head_version, "settings": AgentSettings(**info.settings),
        "forked_from": tenant.public_id(info.forked_from), "forked_at_version": info.forked_at_version,
    }


def context_view(tenant: Tenant, version: ContextVersion) -> dict[str, Any]:
    data = version.model_dump()
    data["agent_id"] = tenant.public_id(version.agent_id)
    return data


def episode_view(tenant: Tenant, row: EpisodeRow) -> dict[str, Any]:
    data = row.model_dump(exclude={"turns", "completes_task"})
    data["agent_id"] = tenant.public_id(row.agent_id)
    data["completion_id"] = row.task_id if (row.task_id or "").startswith("chatcmpl-") else None
    return data


def model_view(public_id: str, info: AgentInfo) -> dict[str, Any]:
    return {"id": public_id, "object": "model", "created": int(info.created_at), "owned_by": "lifecycle-agent"}


# ---------------------------------------------------------------------------------------- the tenant's service


class TenantAgents:
    """The service as one tenant sees it (built per request; holds nothing of its own)."""

    __slots__ = ("service", "tenant")

    def __init__(self, service: AgentService, tenant: Tenant):
        self.service, self.tenant = service, tenant

    @property
    def store(self) -> Store:
        return self.service.store

    def ref(self, public_id: str) -> AgentRef:
        return agent_ref(self.tenant, public_id)

    # ------------------------------------------------------------------ store thread only
    def owned_now(self, ref: AgentRef) -> AgentInfo:
        """The row of one of the caller's agents; ``AgentNotFoundError`` for others' agents and unknown ids alike."""
        try:
            info = self.store.get_agent(ref.stored_id)
        except AgentNotFoundError:
            raise AgentNotFoundError(f"no agent {ref.public_id!r}") from None
        if self.tenant.owner is not None and info.owner != self.tenant.owner:
            raise AgentNotFoundError(f"no agent {ref.public_id!r}")
        return info

    def version_now(self, ref: AgentRef, version: int) -> ContextVersion:
        try:
            return self.store.get_version(ref.stored_id, version)
        except VersionNotFoundError:
            head = self.store.head(ref.stored_id).version
            raise VersionNotFoundError(f"agent {ref.public_id!r} has no context version {version} "
                                       f"(versions 0..{head})") from None

    def head_version_now(self, ref: AgentRef) -> Optional[int]:
        try:
            return self.store.head(ref.stored_id).version
        except AgentNotFoundError:
            return None

    # ------------------------------------------------------------------ agents
    async def list_agents(self) -> list[AgentInfo]:
        """The caller's agents (in local-only mode, every agent)."""
        infos = await self.service.db(self.store.list_agents, owner=self.tenant.owner)
        return [i for i in infos if self.tenant.public_id(i.agent_id)]

    async def create(self, ref: AgentRef, settings: AgentSettings, context: str) -> dict[str, Any]:
        try:
            info = await self.service.db(self.store.create_agent, ref.stored_id, settings.model_dump(),
                                         owner=self.tenant.owner, initial_context=context)
        except AgentExistsError:
            raise AgentExistsError(f"you already have an agent {ref.public_id!r}; choose another id") from None
        return agent_view(self.tenant, info)

    async def import_agent(self, ref: AgentRef, data: dict[str, Any]) -> dict[str, Any]:
        """An agent from an export document (``AgentExistsError``, ``ContextFormatError`` as the store words them)."""
        info = await self.service.db(self.store.import_agent, data, ref.stored_id, owner=self.tenant.owner)
        return agent_view(self.tenant, info)

    async def fork(self, ref: AgentRef, new: AgentRef, version: Optional[int]) -> dict[str, Any]:
        def fork() -> AgentInfo:
            self.owned_now(ref)
            if version is not None:
                self.version_now(ref, version)
            return self.store.fork(ref.stored_id, new.stored_id, version, owner=self.tenant.owner)

        try:
            info = await self.service.db(fork)
        except AgentExistsError:
            raise AgentExistsError(f"you already have an agent {new.public_id!r}; choose another id") from None
        except ContextFormatError as exc:  # the forked context is over the budget (policy reject)
            raise ContextFormatError(ref.in_public_ids(str(exc), new)) from None
        return agent_view(self.tenant, info)

    async def export(self, ref: AgentRef) -> dict[str, Any]:
        data = await self.service.db(self.store.export_agent, ref.stored_id)
        data["agent_id"] = ref.public_id
        return data

    async def delete(self, ref: AgentRef) -> None:
        await self.service.delete(ref.stored_id)  # another delete that ran first: AgentNotFoundError

    # ------------------------------------------------------------------ contexts
    async def context(self, ref: AgentRef, version: Optional[int]) -> dict[str, Any]:
        """The head (or ``version``): the hot read path, one trip to the store's thread."""

        def read() -> ContextVersion:
            self.owned_now(ref)
            return self.store.head(ref.stored_id) if version is None else self.version_now(ref, version)

        return context_view(self.tenant, await self.service.db(read))

    async def history(self, ref: AgentRef, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """One page of context versions, oldest first, and the number of versions."""

        def read() -> tuple[AgentInfo, list[ContextVersion]]:
            return self.owned_now(ref), self.store.history(ref.stored_id, limit=limit, offset=offset)

        info, versions = await self.service.db(read)
        return [context_view(self.tenant, v) for v in versions], info.head_version + 1

    async def diff(self, ref: AgentRef, a: int, b: Optional[int]) -> tuple[int, str]:
        """``(b, unified diff)``, ``b`` defaulting to the head; the file labels name the caller's id."""

        def read() -> tuple[int, str]:
            newer = self.owned_now(ref).head_version if b is None else b
            self.version_now(ref, a)
            self.version_now(ref, newer)
            return newer, self.store.diff(ref.stored_id, a, newer)

        newer, text = await self.service.db(read)
        if ref.stored_id != ref.public_id:  # only the labels, never the contexts' own text
            head, sep, rest = text.partition("\n@@")
            text = head.replace(f"{ref.stored_id}@v", f"{ref.public_id}@v") + sep + rest
        return newer, text

    async def set_context(self, ref: AgentRef, text: str, note: Optional[str]) -> dict[str, Any]:
        """A person's edit (the agent's rule); a refusal comes as ``ContextFormatError`` in the caller's ids."""
        await self.service.db(self.owned_now, ref)
        try:
            version = await self.service.write(ref.stored_id, lambda agent: agent.set_context(text, note))
        except ValueError as exc:  # ContextFormatError among them
            raise ContextFormatError(ref.in_public_ids(str(exc))) from None
        return context_view(self.tenant, version)

    async def rollback(self, ref: AgentRef, version: int) -> dict[str, Any]:
        def check() -> None:
            self.owned_now(ref)
            self.version_now(ref, version)

        await self.service.db(check)
        try:
            ctx = await self.service.write(ref.stored_id, lambda agent: agent.rollback(version))
        except ContextFormatError as exc:  # the old version is over the agent's budget (policy reject)
            raise ContextFormatError(ref.in_public_ids(str(exc))) from None
        return context_view(self.tenant, ctx)

    # ------------------------------------------------------------------ episodes
    async def episodes(self, ref: AgentRef, *, kind: Optional[str], completion_id: Optional[str], limit: int,
                       offset: int, newest_first: bool) -> tuple[list[dict[str, Any]], int]:
        """One page of episodes and how many match."""

        def read() -> tuple[list[EpisodeRow], int]:
            self.owned_now(ref)
            rows = self.store.episodes(ref.stored_id, kind=kind, task_id=completion_id, limit=limit, offset=offset,
                                       newest_first=newest_first)
            if completion_id is None:
                return rows, self.store.count_episodes(ref.stored_id, kind)
            return rows, len(self.store.episodes(ref.stored_id, kind=kind, task_id=completion_id, limit=None))

        rows, total = await self.service.db(read)
        return [episode_view(self.tenant, r) for r in rows], total

    async def episode(self, ref: AgentRef, episode_id: int) -> dict[str, Any]:
        def read() -> Optional[EpisodeRow]:
            self.owned_now(ref)
            try:
                return self.store.get_episode(episode_id)
            except KeyError:
                return None

        row = await self.service.db(read)
        if row is None or row.agent_id != ref.stored_id:
            raise EpisodeNotFoundError(f"agent {ref.public_id!r} has no episode {episode_id}")
        return episode_view(self.tenant, row)

    # ------------------------------------------------------------------ chat + feedback
    async def chat(self, ref: AgentRef, messages: list[dict], *, temperature: Optional[float],
                   max_new_tokens: Optional[int]) -> tuple[str, EpisodeRow, Generation]:
        """A solve episode of an agent the caller owns (checked beforehand by the caller)."""
        try:
            return await self.service.chat(ref.stored_id, messages, temperature=temperature,
                                           max_new_tokens=max_new_tokens)
        except (AgentNotFoundError, sqlite3.IntegrityError):  # deleted while the model was answering
            raise AgentNotFoundError(f"no agent {ref.public_id!r}") from None

    async def rate(self, ref: AgentRef, completion_id: str, reward: Optional[float],
                   feedback: Optional[str]) -> dict[str, Any]:
        """A feedback: the update episode, and the context afterwards with the update's outcome."""

        def find() -> Optional[EpisodeRow]:
            self.owned_now(ref)
            return self.service.find_completion(ref.stored_id, completion_id)

        row = await self.service.db(find)
        if row is None:
            raise CompletionNotFoundError(f"agent {ref.public_id!r} has no completion {completion_id!r}")
        try:
            record, version, policy = await self.service.feedback(ref.stored_id, row.episode_id, reward, feedback)
        except FeedbackConflictError:
            raise AlreadyRatedError(f"completion {completion_id!r} was already rated; each completion takes one "
                                    "feedback", context_version=await self.service.db(self.head_version_now, ref)) from None
        except KeyError:  # AgentNotFoundError among them: deleted while the feedback waited
            raise AgentNotFoundError(f"no agent {ref.public_id!r}") from None
        if record.update_status == "error":
            head = await self.service.db(self.head_version_now, ref)
            what = "timed out" if policy.timed_out else "failed"
            failed = UpdateTimedOutError if policy.timed_out else UpdateFailedError
            raise failed(f"the update episode {what} ({record.error}); the context stays at version {head} and the "
                         f"completion was not rated: send the feedback again to retry", context_version=head)
        if record.update_status == "conflict":
            head = await self.service.db(self.head_version_now, ref)
            raise UpdateConflictError(
                f"the context of agent {ref.public_id!r} changed while the update ran (another server process "
                f"writes to this database); the update was not applied and the completion was not rated: send the "
                f"feedback again to retry", context_version=head)
        return {**context_view(self.tenant, version), "completion_id": completion_id,
                "update_status": record.update_status, "update_episode_id": record.update_episode_id,
                "changed": record.new_context_version is not None}
