//! The columns of a CLI table's header, compared with Docker's. Docker pads its columns with
//! three or more spaces, so its header splits on double spaces; shoal's may be padded with one,
//! so it is read against the column names of Docker's it is compared with. Shared by the suite's
//! parity notes and `tests/docker_parity.rs`.

/// Docker's columns, e.g. `["ID", "HOSTNAME", "MANAGER STATUS"]`.
pub fn columns(docker_header: &str) -> Vec<String> {
    docker_header.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
}

/// Docker's columns that `theirs` lacks (longest names first), and the words of `theirs` that are none of Docker's.
pub fn compare(docker_header: &str, theirs: &str) -> (Vec<String>, Vec<String>) {
    let mut rest = format!(" {} ", theirs.split_whitespace().collect::<Vec<_>>().join(" "));
    let mut lacks = Vec::new();
    // Longer names first, so that STATUS is not taken out of MANAGER STATUS.
    let mut cols = columns(docker_header);
    cols.sort_by_key(|c| std::cmp::Reverse(c.split_whitespace().count()));
    for c in cols {
        let padded = format!(" {c} ");
        match rest.find(&padded) {
            Some(i) => rest.replace_range(i..i + padded.len(), " "),
            None => lacks.push(c),
        }
    }
    (lacks, rest.split_whitespace().map(str::to_owned).collect())
}
