"""bench/store.py at a small size: it runs, checks what it wrote, and prints both columns."""

from bench.store import run


async def test_store_benchmark_small(pg_url):
    lines: list[str] = []
    results = await run(40, 120, pg_url=pg_url, out=lines.append)
    assert set(results) == {"sqlite", "postgresql"}
    for figures in results.values():
        assert len(figures) == 3 and all(v > 0 for v in figures.values())
    assert "PG/SQLite" in lines[1] and len(lines) == 5
