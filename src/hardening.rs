//! Process hardening done first thing in `main`, while the process is still single-threaded:
//! no core dumps, not ptrace-attachable by other users, and secret values wiped from the
//! process's original environment block (what `/proc/self/environ` shows).

use std::ffi::CStr;

/// Makes the process non-dumpable and sets the core-file limit to zero.
pub fn disable_core_dumps() {
    // SAFETY: plain syscalls with valid constant arguments.
    unsafe {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Overwrites, in place, the value of every environment variable named in `names` (and their
/// `CUSTOM_ENV_` forms) with NUL bytes. `/proc/self/environ` reads the original block, which
/// `std::env::remove_var` leaves untouched, so the bytes themselves must go.
///
/// Call only after the values have been read, and only while no other thread runs.
pub fn scrub_environment<'a>(names: impl IntoIterator<Item = &'a str>) {
    let names: Vec<String> = names
        .into_iter()
        .flat_map(|name| [name.to_string(), format!("CUSTOM_ENV_{name}")])
        .collect();
    // SAFETY: single-threaded at this point (documented precondition); `environ` is the C
    // runtime's NULL-terminated array of NUL-terminated strings, each writable.
    unsafe {
        let mut entry = environ;
        if entry.is_null() {
            return;
        }
        while !(*entry).is_null() {
            let text = CStr::from_ptr(*entry).to_bytes();
            if let Some(eq) = text.iter().position(|b| *b == b'=') {
                let name = &text[..eq];
                if names.iter().any(|wanted| wanted.as_bytes() == name) {
                    let value_len = text.len() - eq - 1;
                    std::ptr::write_bytes((*entry).add(eq + 1), 0, value_len);
                }
            }
            entry = entry.add(1);
        }
    }
}
