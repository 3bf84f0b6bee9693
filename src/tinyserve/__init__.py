"""tinyserve: a small LLM serving engine (paged KV cache, token-level scheduling) for the serving chapters of
"Trust, but reproduce". One module per part: model, attention, block_manager, scheduler, engine, workload;
prefix_cache and radix_cache (chapter 07)."""
