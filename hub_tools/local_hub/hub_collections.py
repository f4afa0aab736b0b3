"""Collections: create, get, list, update, delete, and add / update / delete items with notes and positions.

Slugs are ``{owner}/{slugified title}-{24-hex id}``; only the id suffix identifies a collection, so a slug
stays valid after a rename (as on the Hub).
"""

from __future__ import annotations

import html
import re
import secrets

from starlette.responses import Response

from hub_tools.local_hub.context import Call, json_response
from hub_tools.local_hub.protocol import ApiError, now_iso

ITEM_TYPES = ("model", "dataset", "space", "paper", "collection")
NOTE_MAX_CHARS = 500


def slug_of(collection: dict) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", collection["title"].lower()).strip("-") or "collection"
    return f"{collection['owner']}/{words}-{collection['id']}"


def find(call: Call, namespace: str, slug: str) -> dict:
    """The collection a slug names, if the caller may see it; 404 otherwise (the client swallows 404 only)."""
    collection = call.storage.get_collection(slug.rsplit("-", 1)[-1])
    if (
        collection is None
        or collection["owner"] != namespace
        or (collection["private"] and not call.hub.is_member(call.user, collection["owner"]))
    ):
        raise ApiError(404, f"Collection {namespace}/{slug} not found", code="CollectionNotFound")
    return collection


def render(collection: dict, *, with_position: bool = True, max_items: int | None = None) -> dict:
    """The JSON object the client's ``Collection`` class pops its fields from."""
    items = []
    for position, item in enumerate(collection["items"][:max_items]):
        row = {"_id": item["_id"], "id": item["id"], "type": item["type"], "position": position}
        if item["type"] == "collection":
            row["slug"] = item["slug"]
        if item.get("note"):
            row["note"] = {"text": item["note"], "html": html.escape(item["note"])}
        items.append(row)
    out = {
        "slug": slug_of(collection),
        "title": collection["title"],
        "description": collection.get("description") or "",
        "owner": {"name": collection["owner"], "type": "user"},
        "items": items,
        "lastUpdated": collection["lastUpdated"],
        "private": collection["private"],
        "theme": collection["theme"],
        "upvotes": 0,
        "isUpvotedByUser": False,
        "gating": False,
    }
    if with_position:  # list answers must not carry it: the client passes position=i itself
        out["position"] = collection["position"]
    return out


def check_note(note: object) -> str | None:
    if note is None:
        return None
    if len(str(note)) > NOTE_MAX_CHARS:
        raise ApiError(400, f"Note is {len(str(note))} characters; the Hub allows at most {NOTE_MAX_CHARS}")
    return str(note)


# -- collection CRUD -----------------------------------------------------------------------------------------
def create(call: Call) -> Response:
    body = call.json()
    user = call.require_user()
    namespace = body.get("namespace") or user
    call.require_write(namespace)
    title = str(body.get("title") or "").strip()
    if not title:
        raise ApiError(400, "A collection needs a non-empty title")
    with call.storage.lock:
        for other in call.storage.list_collections():
            if other["owner"] == namespace and other["title"] == title:
                raise ApiError(409, f"Collection {title!r} already exists", extra={"slug": slug_of(other)})
        collection = {
            "id": secrets.token_hex(12),
            "owner": namespace,
            "title": title,
            "description": body.get("description") or "",
            "private": bool(body.get("private")),
            "theme": "indigo",
            "position": sum(c["owner"] == namespace for c in call.storage.list_collections()),
            "lastUpdated": now_iso(),
            "items": [],
        }
        call.storage.put_collection(collection)
    return json_response(render(collection))


def get(call: Call, namespace: str, slug: str) -> Response:
    return json_response(render(find(call, namespace, slug)))


def list_all(call: Call) -> Response:
    owners = call.query.get("owner") or []
    item = call.arg("item")
    limit = int(call.arg("limit") or 0) or None
    out = []
    for collection in call.storage.list_collections():
        if collection["private"] and not call.hub.is_member(call.user, collection["owner"]):
            continue
        if owners and collection["owner"] not in owners:
            continue
        if item and not any(f"{i['type']}s/{i['id']}" == item for i in collection["items"]):
            continue
        out.append(collection)
    out.sort(key=lambda c: c["lastUpdated"], reverse=True)
    return json_response([render(c, with_position=False, max_items=4) for c in out[:limit]])


def update(call: Call, namespace: str, slug: str) -> Response:
    body = call.json()
    with call.storage.lock:
        collection = find(call, namespace, slug)
        call.require_write(collection["owner"])
        for key in ("title", "description", "private", "theme", "position"):
            if body.get(key) is not None:
                collection[key] = body[key]
        collection["lastUpdated"] = now_iso()
        call.storage.put_collection(collection)
    return json_response({"success": True, "data": render(collection)})


def delete(call: Call, namespace: str, slug: str) -> Response:
    with call.storage.lock:
        collection = find(call, namespace, slug)
        call.require_write(collection["owner"])
        call.storage.delete_collection(collection["id"])
    return json_response({})


# -- items ---------------------------------------------------------------------------------------------------
def add_item(call: Call, namespace: str, slug: str) -> Response:
    body = call.json()
    item = body.get("item") or {}
    item_type, item_id = item.get("type"), str(item.get("id", ""))
    if item_type not in ITEM_TYPES:
        raise ApiError(400, f"Unknown item type {item_type!r}: use one of {', '.join(ITEM_TYPES)}")
    note = check_note(body.get("note"))
    with call.storage.lock:
        collection = find(call, namespace, slug)
        call.require_write(collection["owner"])
        row = {"_id": secrets.token_hex(12), "type": item_type, "id": item_id, "note": note}
        if item_type in ("model", "dataset", "space"):
            call.readable_repo(item_type, item_id)  # a missing or invisible repo answers 404
        elif item_type == "collection":
            target = find(call, *item_id.split("/", 1)) if "/" in item_id else None
            if target is None:
                raise ApiError(404, f"Collection {item_id} not found", code="CollectionNotFound")
            row |= {"id": target["id"], "slug": slug_of(target)}
        if any(i["type"] == row["type"] and i["id"] == row["id"] for i in collection["items"]):
            raise ApiError(409, f"{item_type} {item_id} is already in the collection")
        collection["items"].append(row)
        collection["lastUpdated"] = now_iso()
        call.storage.put_collection(collection)
    return json_response(render(collection))


def find_item(collection: dict, item_object_id: str) -> dict:
    for item in collection["items"]:
        if item["_id"] == item_object_id:
            return item
    raise ApiError(404, f"Item {item_object_id} is not in the collection", code="EntryNotFound")


def update_item(call: Call, namespace: str, slug: str, item_object_id: str) -> Response:
    body = call.json()
    with call.storage.lock:
        collection = find(call, namespace, slug)
        call.require_write(collection["owner"])
        item = find_item(collection, item_object_id)
        if "note" in body:
            item["note"] = check_note(body["note"])
        if body.get("position") is not None:
            # Moving an item shifts the others: positions stay 0-based and contiguous.
            collection["items"].remove(item)
            position = max(0, min(int(body["position"]), len(collection["items"])))
            collection["items"].insert(position, item)
        collection["lastUpdated"] = now_iso()
        call.storage.put_collection(collection)
    return json_response({"success": True})


def delete_item(call: Call, namespace: str, slug: str, item_object_id: str) -> Response:
    with call.storage.lock:
        collection = find(call, namespace, slug)
        call.require_write(collection["owner"])
        collection["items"].remove(find_item(collection, item_object_id))
        collection["lastUpdated"] = now_iso()
        call.storage.put_collection(collection)
    return json_response({})
