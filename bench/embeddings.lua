-- wrk request for bench/gateway.sh against the embeddings model server
-- (examples/serving/minilm_server.py): one OpenAI embeddings request for a
-- short sentence, as a retrieval or search front end sends them.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "all-MiniLM-L6-v2", "input": "A man is playing a guitar on a stage."}'
