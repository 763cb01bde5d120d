//! Rendezvous from the environment that torchrun, Kubernetes (PyTorchJob, Indexed Jobs)
//! and Slurm set (docs/distributed.md#rendezvous).
//!
//! * torchrun / Kubernetes: `WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`, and
//!   `LOCAL_RANK` (0 when unset: one process per pod).
//! * Slurm (`srun`): `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`; the store's host
//!   is `MASTER_ADDR` if set, else the first host of `SLURM_JOB_NODELIST`
//!   (`SLURM_NODELIST`); its port `MASTER_PORT` if set, else `20000 + SLURM_JOB_ID mod
//!   10000` (so jobs that share a node do not collide).
//!
//! `WORLD_SIZE` wins over the Slurm variables (torchrun inside an sbatch job).
use thiserror::Error;

/// A bad or incomplete rendezvous environment; names the variable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{0} is not set ({1})")]
    Missing(&'static str, &'static str),
    #[error("{name}={value:?}: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
}

/// Where this process stands in the job and where the rendezvous store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub world_size: usize,
    pub rank: usize,
    /// Index of this process on its node (its GPU with `--device cuda`).
    pub local_rank: usize,
    /// Host of the TCP store (rank 0 serves it).
    pub master_addr: String,
    pub master_port: u16,
    /// Which environment it came from: "torchrun" or "slurm".
    pub source: &'static str,
}

fn parse<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    context: &'static str,
) -> Result<T, EnvError>
where
    T::Err: std::fmt::Display,
{
    let value = get(name).ok_or(EnvError::Missing(name, context))?;
    value.trim().parse().map_err(|e: T::Err| EnvError::Invalid {
        name,
        value: value.clone(),
        why: e.to_string(),
    })
}

fn port(get: &dyn Fn(&str) -> Option<String>, context: &'static str) -> Result<u16, EnvError> {
    let p: u16 = parse(get, "MASTER_PORT", context)?;
    if p == 0 {
        return Err(EnvError::Invalid {
            name: "MASTER_PORT",
            value: "0".into(),
            why: "a port from 1 to 65535 is needed".into(),
        });
    }
    Ok(p)
}

fn nonempty(
    get: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    context: &'static str,
) -> Result<String, EnvError> {
    match get(name) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        Some(v) => Err(EnvError::Invalid {
            name,
            value: v,
            why: "empty".into(),
        }),
        None => Err(EnvError::Missing(name, context)),
    }
}

/// The rendezvous described by `get` (an environment lookup), or `None` when neither
/// `WORLD_SIZE` nor `SLURM_NTASKS` is set (a single process).
pub fn rendezvous_from(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Rendezvous>, EnvError> {
    let rv = if get("WORLD_SIZE").is_some() {
        const CTX: &str = "torchrun-style rendezvous: WORLD_SIZE is set";
        let world_size: usize = parse(get, "WORLD_SIZE", CTX)?;
        let rank: usize = parse(get, "RANK", CTX)?;
        let local_rank: usize = match get("LOCAL_RANK") {
            Some(_) => parse(get, "LOCAL_RANK", CTX)?,
            None => 0,
        };
        Rendezvous {
            world_size,
            rank,
            local_rank,
            master_addr: nonempty(get, "MASTER_ADDR", CTX)?,
            master_port: port(get, CTX)?,
            source: "torchrun",
        }
    } else if get("SLURM_NTASKS").is_some() {
        const CTX: &str = "Slurm rendezvous: SLURM_NTASKS is set (run the ranks with srun)";
        let world_size: usize = parse(get, "SLURM_NTASKS", CTX)?;
        let rank: usize = parse(get, "SLURM_PROCID", CTX)?;
        let local_rank: usize = parse(get, "SLURM_LOCALID", CTX)?;
        let master_addr = match get("MASTER_ADDR") {
            Some(_) => nonempty(get, "MASTER_ADDR", CTX)?,
            None => {
                let (name, list) = match get("SLURM_JOB_NODELIST") {
                    Some(l) => ("SLURM_JOB_NODELIST", l),
                    None => ("SLURM_NODELIST", nonempty(get, "SLURM_NODELIST", CTX)?),
                };
                first_host(&list).map_err(|why| EnvError::Invalid {
                    name,
                    value: list.clone(),
                    why,
                })?
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(_) => port(get, CTX)?,
            None => {
                let job: u64 = parse(
                    get,
                    "SLURM_JOB_ID",
                    "Slurm rendezvous without MASTER_PORT: the port is derived from the job id",
                )?;
                20000 + (job % 10000) as u16
            }
        };
        Rendezvous {
            world_size,
            rank,
            local_rank,
            master_addr,
            master_port,
            source: "slurm",
        }
    } else {
        return Ok(None);
    };
    let (world_var, rank_var) = match rv.source {
        "slurm" => ("SLURM_NTASKS", "SLURM_PROCID"),
        _ => ("WORLD_SIZE", "RANK"),
    };
    if rv.world_size == 0 {
        return Err(EnvError::Invalid {
            name: world_var,
            value: "0".into(),
            why: "at least 1 process is needed".into(),
        });
    }
    if rv.rank >= rv.world_size {
        return Err(EnvError::Invalid {
            name: rank_var,
            value: rv.rank.to_string(),
            why: format!("must be below {world_var}={}", rv.world_size),
        });
    }
    Ok(Some(rv))
}

/// The rendezvous of this process's environment (see [`rendezvous_from`]).
pub fn rendezvous() -> Result<Option<Rendezvous>, EnvError> {
    rendezvous_from(&|name| std::env::var(name).ok())
}

/// Splits at the commas that are outside brackets.
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ']'".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '['".into());
    }
    out.push(&list[start..]);
    Ok(out)
}

/// Expands one bracket group's body (`01-03,7`) to its members, zero padding kept.
fn expand_range(body: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in body.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (x, y): (u64, u64) = (
                    a.parse().map_err(|_| format!("bad range {part:?}"))?,
                    b.parse().map_err(|_| format!("bad range {part:?}"))?,
                );
                if y < x {
                    return Err(format!("bad range {part:?}"));
                }
                let width = a.len();
                out.extend((x..=y).map(|v| format!("{v:0width$}")));
            }
            None if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => {
                out.push(part.to_string())
            }
            None => return Err(format!("bad range {part:?}")),
        }
    }
    Ok(out)
}

/// Expands a Slurm host list (`node[01-03],gpu7`, `rack[1-2]-n[1,3]`) in Slurm's order.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for entry in split_top(list.trim())? {
        if entry.is_empty() {
            return Err("empty host name".into());
        }
        // Cartesian product over the bracket groups, left to right.
        let mut names = vec![String::new()];
        let mut rest = entry;
        while let Some(open) = rest.find('[') {
            let close = rest[open..]
                .find(']')
                .map(|c| open + c)
                .ok_or("unbalanced '['")?;
            let members = expand_range(&rest[open + 1..close])?;
            let prefix = &rest[..open];
            names = names
                .iter()
                .flat_map(|n| members.iter().map(move |m| format!("{n}{prefix}{m}")))
                .collect();
            rest = &rest[close + 1..];
        }
        hosts.extend(names.into_iter().map(|n| format!("{n}{rest}")));
    }
    Ok(hosts)
}

/// The first host of a Slurm host list.
pub fn first_host(list: &str) -> Result<String, String> {
    expand_nodelist(list)?
        .into_iter()
        .next()
        .ok_or_else(|| "no host".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn no_variables_is_one_process() {
        assert_eq!(rendezvous_from(&env(&[])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let rv = rendezvous_from(&env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            rv,
            Rendezvous {
                world_size: 4,
                rank: 3,
                local_rank: 1,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                source: "torchrun",
            }
        );
    }

    #[test]
    fn kubernetes_without_local_rank() {
        let rv = rendezvous_from(&env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((rv.rank, rv.local_rank), (1, 0));
    }

    #[test]
    fn missing_and_bad_variables_are_named() {
        let full = [
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1234"),
        ];
        for skip in ["RANK", "MASTER_ADDR", "MASTER_PORT"] {
            let pairs: Vec<_> = full.iter().copied().filter(|(k, _)| *k != skip).collect();
            let e = rendezvous_from(&env(&pairs)).unwrap_err();
            assert!(
                matches!(e, EnvError::Missing(n, _) if n == skip),
                "{skip}: {e}"
            );
            assert!(e.to_string().starts_with(skip), "{e}");
        }
        let bad = |k: &str, v: &str| {
            let pairs: Vec<_> = full
                .iter()
                .map(|&(a, b)| (a, if a == k { v } else { b }))
                .collect();
            rendezvous_from(&env(&pairs)).unwrap_err().to_string()
        };
        assert!(bad("WORLD_SIZE", "two").starts_with("WORLD_SIZE=\"two\""));
        assert!(bad("RANK", "2").contains("below WORLD_SIZE=2"));
        assert!(bad("MASTER_PORT", "70000").starts_with("MASTER_PORT"));
        assert!(bad("MASTER_PORT", "0").starts_with("MASTER_PORT"));
        assert!(bad("MASTER_ADDR", " ").starts_with("MASTER_ADDR"));
        assert!(bad("WORLD_SIZE", "0").starts_with("WORLD_SIZE"));
    }

    #[test]
    fn slurm_variables() {
        let rv = rendezvous_from(&env(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "node[01-03],gpu7"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            rv,
            Rendezvous {
                world_size: 8,
                rank: 5,
                local_rank: 1,
                master_addr: "node01".into(),
                master_port: 20000 + 3456,
                source: "slurm",
            }
        );
        // MASTER_ADDR / MASTER_PORT override; WORLD_SIZE wins over Slurm.
        let rv = rendezvous_from(&env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "a,b"),
            ("MASTER_ADDR", "b"),
            ("MASTER_PORT", "4000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((rv.master_addr.as_str(), rv.master_port), ("b", 4000));
        let e = rendezvous_from(&env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_JOB_NODELIST", "a"),
        ]))
        .unwrap_err();
        assert_eq!(
            e,
            EnvError::Missing(
                "SLURM_LOCALID",
                "Slurm rendezvous: SLURM_NTASKS is set (run the ranks with srun)"
            )
        );
        let e = rendezvous_from(&env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "a"),
        ]))
        .unwrap_err();
        assert!(matches!(e, EnvError::Missing("SLURM_JOB_ID", _)), "{e}");
        let e = rendezvous_from(&env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "n[3-1]"),
        ]))
        .unwrap_err();
        assert!(e.to_string().starts_with("SLURM_JOB_NODELIST"), "{e}");
    }

    #[test]
    fn nodelists() {
        let x = |s: &str| expand_nodelist(s).unwrap();
        assert_eq!(
            x("node[01-03],gpu7"),
            ["node01", "node02", "node03", "gpu7"]
        );
        assert_eq!(x("gpu7,node[1,3-4]"), ["gpu7", "node1", "node3", "node4"]);
        assert_eq!(x("host"), ["host"]);
        assert_eq!(
            x("r[1-2]-n[08-09].ib"),
            ["r1-n08.ib", "r1-n09.ib", "r2-n08.ib", "r2-n09.ib"]
        );
        assert_eq!(first_host("node[098-101]").unwrap(), "node098");
        for bad in ["", "n[1-", "n]", "n[a-b]", "a,,b", "n[]"] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?}");
        }
    }
}
