"""A small external Powerstrip adapter, run by tests as a real process: `python labeler.py PORT`.

/label      pre-hook: adds the label powerplane.test=pre-hook to a container create
/rewrite    post-hook: answers 201, text/plain, "rewritten:<Docker's code>"
/fail       answers 500 with a message the client must see
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def label(request: web.Request) -> web.Response:
    message = await request.json()
    client_request = message["ClientRequest"]
    body = json.loads(client_request["Body"])
    body.setdefault("Labels", {})["powerplane.test"] = "pre-hook"
    client_request["Body"] = json.dumps(body)
    return web.json_response({"PowerstripProtocolVersion": 1,
                              "ModifiedClientRequest": client_request})


async def rewrite(request: web.Request) -> web.Response:
    message = await request.json()
    code = message["ServerResponse"]["Code"]
    return web.json_response({"PowerstripProtocolVersion": 1, "ModifiedServerResponse": {
        "Code": 201, "ContentType": "text/plain", "Body": f"rewritten:{code}"}})


async def fail(request: web.Request) -> web.Response:
    return web.Response(status=500, text="quota exceeded for this tenant")


def main() -> None:
    app = web.Application()
    app.add_routes([web.post("/label", label), web.post("/rewrite", rewrite),
                    web.post("/fail", fail)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
