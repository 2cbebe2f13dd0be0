from renderers.client import _parse_completion_logprobs, MalformedGenerateResponseError
choice = {"token_ids": [5, 7], "logprobs": {"content": [
    {"token_id": 5, "logprob": -0.1, "rank": 1, "top_logprobs": []},
    {"token_id": 7, "logprob": -0.2, "rank": None, "top_logprobs": []}]},
    "weight_versions": [{"version": "3", "start": 0, "end": 2}]}
try:
    _parse_completion_logprobs(choice, choice["token_ids"])
except MalformedGenerateResponseError as e:
    print("vLLM 0.32 shape:", e)
for entry in choice["logprobs"]["content"]:
    entry["token"] = f"token_id:{entry['token_id']}"
print("after adapter:", _parse_completion_logprobs(choice, choice["token_ids"]))
