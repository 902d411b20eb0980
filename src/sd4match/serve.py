"""``sd4match serve``: a local web page to click a point in one image and see its match.

A FastAPI app with a single static page (``static/index.html``). The model and every
image's features stay in this process; each image is decoded once on upload and its
features are extracted once (``Matcher`` caches them by content), so a click on cached
images costs one correlation.

The app binds to loopback by default, refuses uploads over ``max_upload_bytes`` before
reading them, images over ``max_pixels`` before decoding them, and anything that is not
an image with a one-line message.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures at run time
import base64
import hashlib
import io
import json
import re
import tempfile
import threading
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path

from sd4match.data.images import image_size, list_images
from sd4match.errors import Sd4MatchError
from sd4match.usermatch import MAX_SIDE, Matcher, UserImage, open_image
from sd4match.viz import heat_image

PAGE = "index.html"


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageStore:
    """Uploaded and example images by id (their content hash), the newest ``size`` kept."""

    def __init__(self, folder: Path, *, max_pixels: int, max_side: int, size: int = 64):
        self.folder, self.max_pixels, self.max_side, self.size = folder, max_pixels, max_side, size
        self.items: OrderedDict[str, tuple[UserImage, bytes]] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, data: bytes, name: str) -> tuple[str, UserImage]:
        ident = hashlib.sha256(data).hexdigest()[:24]
        with self.lock:
            if ident in self.items:
                self.items.move_to_end(ident)
                return ident, self.items[ident][0]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[-80:] or "image"
        path = self.folder / f"{ident}-{safe}"
        path.write_bytes(data)
        try:
            w, h = image_size(path)  # header only: refuse huge images before decoding them
            if w * h > self.max_pixels:
                raise Sd4MatchError(f"{safe}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the {self.max_pixels / 1e6:g} megapixel limit")
            img = open_image(path, max_side=self.max_side)
        except Sd4MatchError as e:
            path.unlink(missing_ok=True)
            raise Sd4MatchError(str(e).replace(str(path), safe)) from None
        img = UserImage(img.image, img.size, safe, img.key)
        png = _png(img.image)
        with self.lock:
            self.items[ident] = (img, png)
            while len(self.items) > self.size:
                old, _ = self.items.popitem(last=False)
                for p in self.folder.glob(f"{old}-*"):
                    p.unlink(missing_ok=True)
        return ident, img

    def get(self, ident: str) -> tuple[UserImage, bytes]:
        with self.lock:
            if ident not in self.items:
                raise KeyError(ident)
            return self.items[ident]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app sees it,
    whether or not the client announced its length (the body is read here, up to the limit).

    ``shown`` is the limit the message names (the file size users set, without the
    multipart framing allowance)."""

    def __init__(self, app, limit: int, shown: int | None = None):
        self.app, self.limit, self.shown = app, limit, shown or limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send, seen)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps({"error": f"upload of {size / 1e6:.1f} MB or more is over the {self.shown / 1e6:g} MB limit"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def opening_pair(folder: str | Path, names: list[str]) -> list[str]:
    """The two pictures the page opens with: the first pair of ``<folder>/pairs.txt`` (lines
    ``a.jpg b.jpg``: pictures of the same kind) whose pictures exist, else the first two."""
    listed = Path(folder) / "pairs.txt"
    if listed.is_file():
        for line in listed.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("#")[0].split()
            if len(parts) == 2 and all(p in names for p in parts):
                return parts
    return names[:2]


def create_app(matcher: Matcher, *, images: str | Path | None = None, max_upload_bytes: int = 20_000_000, max_pixels: int = 50_000_000,
               max_side: int = MAX_SIDE, workdir: str | Path | None = None):
    """The FastAPI app; ``images`` is a folder whose pictures the page offers as examples."""
    from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sd4match-serve-")
        workdir = tmp.name
    store = ImageStore(Path(workdir), max_pixels=max_pixels, max_side=max_side)
    examples = {p.relative_to(images).as_posix(): p for p in list_images(images)} if images else {}
    first = opening_pair(images, sorted(examples)) if images else []
    model_lock = threading.Lock()  # one forward pass at a time; the feature cache is not thread-safe
    app = FastAPI(title="sd4match", docs_url=None, redoc_url=None)
    app.state.tmp = tmp  # keeps the upload folder alive as long as the app

    @app.exception_handler(Sd4MatchError)
    async def _bad_input(request: Request, exc: Sd4MatchError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    app.add_middleware(BodyLimit, limit=max_upload_bytes + 65536, shown=max_upload_bytes)  # the file plus its multipart framing

    def _image(ident: str) -> UserImage:
        try:
            return store.get(ident)[0]
        except KeyError:
            raise HTTPException(404, f"no image {ident}; upload it again") from None

    def _describe(ident: str, img: UserImage) -> dict:
        return {"id": ident, "name": img.name, "size": list(img.size), "url": f"api/images/{ident}"}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return resources.files("sd4match").joinpath("static", PAGE).read_text(encoding="utf-8")

    @app.get("/api/config")
    def config():
        s = matcher.settings()
        return {"model": matcher.featurizer.model_id, "prompt": s["prompt"], "rule": s["rule"], "examples": sorted(examples), "first_pair": first,
                "max_upload_mb": max_upload_bytes / 1e6, "max_megapixels": max_pixels / 1e6}

    @app.post("/api/images")
    async def upload(file: UploadFile = File(...)):
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return JSONResponse({"error": f"{file.filename}: over the {max_upload_bytes / 1e6:g} MB upload limit"}, status_code=413)
        if not data:
            raise Sd4MatchError(f"{file.filename}: empty file")
        ident, img = store.add(data, file.filename or "upload")
        return _describe(ident, img)

    @app.post("/api/examples/{name:path}")
    def pick(name: str):
        if name not in examples:
            raise HTTPException(404, f"no example {name!r}")
        ident, img = store.add(examples[name].read_bytes(), name)
        return _describe(ident, img)

    @app.get("/api/images/{ident}")
    def picture(ident: str):
        try:
            return Response(store.get(ident)[1], media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        except KeyError:
            raise HTTPException(404, f"no image {ident}") from None

    class Pair(BaseModel):
        a: str
        b: str

    class Click(Pair):
        x: float
        y: float

    @app.post("/api/prepare")
    def prepare(pair: Pair):
        a, b = _image(pair.a), _image(pair.b)
        t0 = time.perf_counter()
        with model_lock:
            cached = matcher.is_cached(a, b)
            matcher.features(a, b)
        return {"cached": cached, "seconds": round(time.perf_counter() - t0, 3)}

    @app.post("/api/match")
    def match(click: Click):
        """The click (x, y) in ``a``'s original pixels, rounded to 0.01 as ``sd4match match`` reports it."""
        a, b = _image(click.a), _image(click.b)
        point = (round(click.x, 2), round(click.y, 2))
        t0 = time.perf_counter()
        with model_lock:
            m = matcher.match_points(a, b, [("click", point)])[0]
            sim = matcher.similarity(a, b, point)
        w, h = b.image.size
        f = min(1.0, 640 / max(w, h))
        heat = heat_image(sim, (max(1, round(w * f)), max(1, round(h * f))))
        return {**m, "heatmap": "data:image/png;base64," + base64.b64encode(_png(heat)).decode(), "similarity_range": [round(float(sim.min()), 4), round(float(sim.max()), 4)],
                "seconds": round(time.perf_counter() - t0, 3)}

    return app


def check_serve(host: str, port: int) -> None:
    """What the page needs, checked before a model loads: FastAPI and uvicorn installed, and
    ``host:port`` free to listen on (not taken by another page or program)."""
    import errno
    import socket

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise Sd4MatchError("sd4match serve needs FastAPI and uvicorn: pip install 'sd4match[serve]'") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise Sd4MatchError(f"--host {host}: not an address of this machine ({e})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port left in TIME_WAIT is free
        try:
            sock.bind(addr)
        except OSError as e:
            hint = "choose another --port" if e.errno == errno.EADDRINUSE else "check --host and --port"
            raise Sd4MatchError(f"{host}:{port}: cannot listen there ({e.strerror or e}); {hint}") from None


def serve(matcher: Matcher, *, host: str = "127.0.0.1", port: int = 7860, **kwargs) -> None:
    """Run the page until interrupted."""
    check_serve(host, port)
    import uvicorn

    app = create_app(matcher, **kwargs)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sd4match: warning: serving on {host}: anyone who can reach this address can use the page", flush=True)
    print(f"sd4match serve: open http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
