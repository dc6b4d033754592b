//! Compares candidate layouts of the readings table, so the choice in ARCHITECTURE.md rests on
//! numbers: rows/s for batched inserts, bytes/row on disk, and a device/time-range query.
//!
//! Run: `cargo bench -p gateway --bench store_layout` (optionally `-- ROWS`).

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, SqlSafeStr, SqliteConnection};

struct Layout {
    name: &'static str,
    ddl: &'static str,
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "A rowid + unique(device,seq,idx) + index(device,ts)",
        ddl: "CREATE TABLE readings (device INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL, UNIQUE(device, seq, idx));
              CREATE INDEX readings_device_ts ON readings(device, ts);",
    },
    Layout {
        name: "E rowid, no index (ceiling)",
        ddl: "CREATE TABLE readings (device INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL);",
    },
    Layout {
        name: "B rowid + index(device,ts)",
        ddl: "CREATE TABLE readings (device INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL);
              CREATE INDEX readings_device_ts ON readings(device, ts);",
    },
    Layout {
        name: "C without rowid, pk(device,seq,idx)",
        ddl: "CREATE TABLE readings (device INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY(device, seq, idx)) WITHOUT ROWID;",
    },
    Layout {
        name: "D without rowid, pk(device,ts,seq,idx)",
        ddl: "CREATE TABLE readings (device INTEGER NOT NULL, ts INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY(device, ts, seq, idx)) WITHOUT ROWID;",
    },
];

fn cache_kib() -> u64 {
    std::env::var("CACHE_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

const DEVICES: u64 = 1000;
const PER_DATAGRAM: u64 = 16;
const PER_TXN: u64 = 8192;
const PER_STMT: usize = 256;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let rows: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000)
        / PER_TXN
        * PER_TXN;
    let dir = tempfile::tempdir()?;
    println!("cache {} KiB", cache_kib());
    println!(
        "{rows} rows, {DEVICES} devices, {PER_DATAGRAM} readings/datagram, {PER_TXN} rows/transaction, {PER_STMT} rows/statement"
    );
    for (i, layout) in LAYOUTS.iter().enumerate() {
        let path = dir.path().join(format!("l{i}.db"));
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .pragma("cache_size", format!("-{}", cache_kib()));
        let mut conn = SqliteConnection::connect_with(&opts).await?;
        conn.execute(layout.ddl).await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO readings (device, seq, idx, sensor, ts, value) VALUES {}",
            vec!["(?,?,?,?,?,?)"; PER_STMT].join(",")
        ))
        .into_sql_str();
        let start = std::time::SystemTime::now();
        let mut n = 0u64;
        let base_ts = 1_764_000_000_000i64;
        while n < rows {
            let mut tx = conn.begin().await?;
            let end = (n + PER_TXN).min(rows);
            let mut batch: Vec<(i64, i64, i64, i64, i64, f64)> = (n..end)
                .map(|r| {
                    let datagram = r / PER_DATAGRAM;
                    let device = datagram % DEVICES;
                    let seq = datagram / DEVICES;
                    let idx = r % PER_DATAGRAM;
                    (
                        device as i64,
                        seq as i64,
                        idx as i64,
                        (idx % 4) as i64,
                        base_ts + (seq * PER_DATAGRAM + idx) as i64 * 10,
                        20.0 + (r % 1000) as f64 / 100.0,
                    )
                })
                .collect();
            if std::env::var_os("SORT").is_some() {
                batch.sort_unstable_by_key(|r| (r.0, r.4, r.1, r.2));
            }
            for chunk in batch.chunks(PER_STMT) {
                let mut q = sqlx::query(sql.clone());
                for r in chunk {
                    q = q
                        .bind(r.0)
                        .bind(r.1)
                        .bind(r.2)
                        .bind(r.3)
                        .bind(r.4)
                        .bind(r.5);
                }
                q.execute(&mut *tx).await?;
            }
            n = end;
            tx.commit().await?;
        }
        let secs = start.elapsed()?.as_secs_f64();
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
        let size = std::fs::metadata(&path)?.len();
        let qstart = std::time::SystemTime::now();
        let mut hits = 0i64;
        for d in 0..100i64 {
            let (c,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM readings WHERE device = ? AND ts >= ? AND ts < ?",
            )
            .bind(d)
            .bind(base_ts + 5_000)
            .bind(base_ts + 10_000)
            .fetch_one(&mut conn)
            .await?;
            hits += c;
        }
        let qms = qstart.elapsed()?.as_secs_f64() * 1000.0 / 100.0;
        println!(
            "{:<55} {:>10.0} rows/s {:>6.1} bytes/row  device+time query {:>8.2} ms ({hits} rows)",
            layout.name,
            rows as f64 / secs,
            size as f64 / rows as f64,
            qms
        );
    }
    Ok(())
}
