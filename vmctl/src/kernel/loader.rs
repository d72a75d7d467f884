//! Turning a program name into a running image: PATH search, `#!` scripts, ELF
//! loading with the ELF interpreter, and the initial stack with argv, envp and the
//! auxiliary vector, laid out as Linux's binfmt_elf does.

use super::mm::{Access, AddressSpace, Backing, MappedFile, MmCtx, VmaKind};
use crate::machine::layout::PAGE_SIZE;
use goblin::elf::{header, program_header, Header, ProgramHeader};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Where Linux puts a PIE executable when address-space randomisation is off.
const ELF_ET_DYN_BASE: u64 = 0x5555_5555_4000;
const MAX_SHEBANG_DEPTH: usize = 4;

#[derive(Debug, Error)]
pub enum ExecError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: {1}")]
    NotExecutable(String, String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: not enough guest memory to load it (raise --mem)")]
    NoMemory(String),
}

impl ExecError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecError::NotFound(_) => 127,
            ExecError::Io(_, e) if e.kind() == std::io::ErrorKind::NotFound => 127,
            _ => 126,
        }
    }
}

/// Finds `name` as a shell would: a name with a slash is a path, anything else is
/// looked up in `$PATH`.
pub fn resolve_program(name: &str, path_env: Option<&OsStr>) -> Result<PathBuf, ExecError> {
    if name.is_empty() {
        return Err(ExecError::NotFound(name.into()));
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return match p.metadata() {
            Ok(_) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ExecError::NotFound(name.into()))
            }
            Err(e) => Err(ExecError::Io(name.into(), e)),
        };
    }
    let path_env = path_env
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_else(|| b"/usr/local/bin:/usr/bin:/bin".to_vec());
    let mut non_executable = None;
    for dir in path_env.split(|&b| b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let cand = Path::new(OsStr::from_bytes(dir)).join(name);
        if let Ok(md) = cand.metadata() {
            if md.is_file() {
                if md.permissions().mode() & 0o111 != 0 {
                    return Ok(cand);
                }
                non_executable.get_or_insert(cand);
            }
        }
    }
    match non_executable {
        Some(p) => Err(ExecError::NotExecutable(
            p.display().to_string(),
            "Permission denied".into(),
        )),
        None => Err(ExecError::NotFound(name.into())),
    }
}

/// What the loader leaves for the first vCPU entry.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub entry: u64,
    pub stack_pointer: u64,
    /// The executable the guest sees as /proc/self/exe.
    pub exe: PathBuf,
}

struct Image {
    file: Arc<MappedFile>,
    header: Header,
    phdrs: Vec<ProgramHeader>,
}

fn open_image(path: &Path) -> Result<(Image, Vec<u8>), ExecError> {
    let shown = path.display().to_string();
    let md = path
        .metadata()
        .map_err(|e| ExecError::Io(shown.clone(), e))?;
    if md.is_dir() {
        return Err(ExecError::NotExecutable(shown, "Is a directory".into()));
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(ExecError::NotExecutable(shown, "Permission denied".into()));
    }
    let mut file = File::open(path).map_err(|e| ExecError::Io(shown.clone(), e))?;
    let mut head = vec![0u8; 256];
    let n = read_full(&mut file, &mut head).map_err(|e| ExecError::Io(shown.clone(), e))?;
    head.truncate(n);
    let not_elf = || {
        ExecError::NotExecutable(
            shown.clone(),
            "cannot execute: not an x86-64 ELF executable".into(),
        )
    };
    if head.len() < 64 || &head[..4] != header::ELFMAG {
        return Err(not_elf());
    }
    let hdr = goblin::elf::Elf::parse_header(&head).map_err(|_| not_elf())?;
    if hdr.e_ident[header::EI_CLASS] != header::ELFCLASS64
        || hdr.e_machine != header::EM_X86_64
        || !matches!(hdr.e_type, header::ET_EXEC | header::ET_DYN)
    {
        return Err(not_elf());
    }
    // Bounded as Linux's binfmt_elf bounds it, before anything is allocated.
    let ph_size = hdr.e_phnum as usize * hdr.e_phentsize as usize;
    if hdr.e_phentsize as usize
        != std::mem::size_of::<goblin::elf64::program_header::ProgramHeader>()
        || ph_size == 0
        || ph_size > 65536
    {
        return Err(not_elf());
    }
    let mut ph_bytes = vec![0u8; ph_size];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut ph_bytes, hdr.e_phoff)
        .map_err(|_| not_elf())?;
    let ctx = goblin::container::Ctx::new(
        goblin::container::Container::Big,
        goblin::container::Endian::Little,
    );
    let phdrs =
        ProgramHeader::parse(&ph_bytes, 0, hdr.e_phnum as usize, ctx).map_err(|_| not_elf())?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok((
        Image {
            file: Arc::new(
                MappedFile::new(canonical, file).map_err(|e| ExecError::Io(shown.clone(), e))?,
            ),
            header: hdr,
            phdrs,
        },
        head,
    ))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Parses a `#!` line into (interpreter, optional single argument), as Linux does.
fn parse_shebang(head: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line: &[u8] = trim(line);
    if line.is_empty() {
        return None;
    }
    let split = line.iter().position(|&b| b == b' ' || b == b'\t');
    match split {
        None => Some((line.to_vec(), None)),
        Some(i) => {
            let arg = trim(&line[i..]);
            Some((line[..i].to_vec(), (!arg.is_empty()).then(|| arg.to_vec())))
        }
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

struct Loaded {
    bias: u64,
    entry: u64,
    phdr: u64,
    end: u64,
}

fn prot_of(flags: u32) -> i32 {
    let mut p = 0;
    if flags & program_header::PF_R != 0 {
        p |= libc::PROT_READ;
    }
    if flags & program_header::PF_W != 0 {
        p |= libc::PROT_WRITE;
    }
    if flags & program_header::PF_X != 0 {
        p |= libc::PROT_EXEC;
    }
    p
}

fn load_segments(
    mm: &mut AddressSpace,
    ctx: &mut MmCtx,
    img: &Image,
    is_main: bool,
) -> Result<Loaded, ExecError> {
    let name = img.file.path.display().to_string();
    let loads: Vec<&ProgramHeader> = img
        .phdrs
        .iter()
        .filter(|p| p.p_type == program_header::PT_LOAD)
        .collect();
    if loads.is_empty() {
        return Err(ExecError::NotExecutable(
            name,
            "no loadable segments".into(),
        ));
    }
    let lo = loads
        .iter()
        .map(|p| p.p_vaddr & !(PAGE_SIZE - 1))
        .min()
        .unwrap_or(0);
    let hi = loads
        .iter()
        .map(|p| p.p_vaddr + p.p_memsz)
        .max()
        .unwrap_or(0);
    let span = (hi - lo).next_multiple_of(PAGE_SIZE);
    let bias = if img.header.e_type == header::ET_DYN {
        let want = if is_main { ELF_ET_DYN_BASE } else { 0 };
        mm.find_free(want, span)
            .ok_or_else(|| ExecError::NoMemory(name.clone()))?
            - lo
    } else {
        0
    };
    let nomem = |_| ExecError::NoMemory(name.clone());
    for p in &loads {
        let prot = prot_of(p.p_flags);
        let seg = bias + p.p_vaddr;
        let page = seg & !(PAGE_SIZE - 1);
        let file_end = (seg + p.p_filesz).next_multiple_of(PAGE_SIZE);
        let mem_end = (seg + p.p_memsz).next_multiple_of(PAGE_SIZE);
        if p.p_filesz > 0 {
            let offset = p.p_offset - (p.p_vaddr & (PAGE_SIZE - 1));
            mm.map(
                ctx,
                page,
                file_end - page,
                prot,
                false,
                Backing::File {
                    file: img.file.clone(),
                    offset,
                    region: None,
                },
                VmaKind::Mapping,
            )
            .map_err(nomem)?;
            // The rest of the last file page belongs to bss and must read as zero.
            let tail = seg + p.p_filesz;
            if p.p_memsz > p.p_filesz && tail % PAGE_SIZE != 0 {
                let gpa = mm.translate_for(ctx, tail, Access::Read).map_err(nomem)?;
                ctx.mem.zero(gpa, PAGE_SIZE - tail % PAGE_SIZE);
            }
        }
        let anon_start = if p.p_filesz > 0 { file_end } else { page };
        if mem_end > anon_start {
            mm.map(
                ctx,
                anon_start,
                mem_end - anon_start,
                prot,
                false,
                Backing::Anonymous,
                VmaKind::Mapping,
            )
            .map_err(nomem)?;
        }
    }
    let phdr = img
        .phdrs
        .iter()
        .find(|p| p.p_type == program_header::PT_PHDR)
        .map(|p| bias + p.p_vaddr)
        .or_else(|| {
            loads
                .iter()
                .find(|p| {
                    p.p_offset <= img.header.e_phoff && img.header.e_phoff < p.p_offset + p.p_filesz
                })
                .map(|p| bias + p.p_vaddr + (img.header.e_phoff - p.p_offset))
        })
        .unwrap_or(0);
    Ok(Loaded {
        bias,
        entry: bias + img.header.e_entry,
        phdr,
        end: bias + hi,
    })
}

/// Auxiliary vector entries and the values the loader needs from the host.
pub struct HostInfo {
    pub hwcap: u64,
    pub minsigstksz: u64,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// The vDSO to map into the new image (AT_SYSINFO_EHDR), if the VM has one.
    pub vdso: Option<super::vdso::VdsoFrames>,
}

/// Loads `path` (or the interpreter of a `#!` script) into `mm` and builds its stack.
pub fn load_program(
    mm: &mut AddressSpace,
    ctx: &mut MmCtx,
    path: &Path,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    stack_size: u64,
    host: &HostInfo,
) -> Result<StartInfo, ExecError> {
    let mut argv = argv.to_vec();
    let mut path = path.to_path_buf();
    let execfn = path.as_os_str().as_bytes().to_vec();
    let mut depth = 0;
    let (main, _) = loop {
        let (img, head) = match open_image(&path) {
            Ok(x) => x,
            Err(ExecError::NotExecutable(n, why)) if why.contains("not an x86-64") => {
                // Maybe a script.
                let mut head = vec![0u8; 256];
                let got = File::open(&path)
                    .and_then(|mut f| read_full(&mut f, &mut head))
                    .unwrap_or(0);
                head.truncate(got);
                match parse_shebang(&head) {
                    Some((interp, arg)) if depth < MAX_SHEBANG_DEPTH => {
                        depth += 1;
                        let mut new_argv = vec![interp.clone()];
                        new_argv.extend(arg);
                        new_argv.push(path.as_os_str().as_bytes().to_vec());
                        new_argv.extend(argv.iter().skip(1).cloned());
                        argv = new_argv;
                        path = PathBuf::from(OsStr::from_bytes(&interp));
                        continue;
                    }
                    _ => return Err(ExecError::NotExecutable(n, why)),
                }
            }
            Err(e) => return Err(e),
        };
        break (img, head);
    };
    let exe_loaded = load_segments(mm, ctx, &main, true)?;
    let interp = main
        .phdrs
        .iter()
        .find(|p| p.p_type == program_header::PT_INTERP)
        .map(|p| {
            // The program file is the user's: the interpreter name's size is bounded
            // before it allocates, as Linux's binfmt_elf bounds it.
            if p.p_filesz < 2 || p.p_filesz > libc::PATH_MAX as u64 {
                return Err(ExecError::NotExecutable(
                    path.display().to_string(),
                    "its ELF interpreter name is not a path (bad PT_INTERP size)".into(),
                ));
            }
            let mut b = vec![0u8; p.p_filesz as usize];
            use std::os::unix::fs::FileExt;
            let f = main.file.file.as_ref().expect("open image");
            f.read_exact_at(&mut b, p.p_offset).ok();
            while b.last() == Some(&0) {
                b.pop();
            }
            Ok(PathBuf::from(OsStr::from_bytes(&b)))
        })
        .transpose()?;
    let (entry, interp_base) = match &interp {
        Some(ip) => {
            let (img, _) = open_image(ip)?;
            let l = load_segments(mm, ctx, &img, false)?;
            (l.entry, l.bias)
        }
        None => (exe_loaded.entry, 0),
    };
    mm.set_brk_start(exe_loaded.end.next_multiple_of(PAGE_SIZE));

    let nomem = |_| ExecError::NoMemory(path.display().to_string());
    // Below the interpreter, as Linux places it with randomisation off.
    let vdso_ehdr = match &host.vdso {
        Some(v) => Some(v.map_into(mm, ctx).map_err(nomem)?),
        None => None,
    };
    let stack_top = super::mm::address_space::STACK_TOP;
    mm.map(
        ctx,
        stack_top - stack_size,
        stack_size,
        libc::PROT_READ | libc::PROT_WRITE,
        false,
        Backing::Anonymous,
        VmaKind::Stack,
    )
    .map_err(nomem)?;

    let mut sp = stack_top;
    let mut push_bytes =
        |mm: &mut AddressSpace, ctx: &mut MmCtx, data: &[u8]| -> Result<u64, ExecError> {
            sp -= data.len() as u64;
            mm.write(ctx, sp, data).map_err(nomem)?;
            Ok(sp)
        };
    let with_nul = |s: &[u8]| {
        let mut v = s.to_vec();
        v.push(0);
        v
    };
    let execfn_ptr = push_bytes(mm, ctx, &with_nul(&execfn))?;
    let mut env_ptrs = Vec::new();
    for e in envp.iter().rev() {
        env_ptrs.push(push_bytes(mm, ctx, &with_nul(e))?);
    }
    env_ptrs.reverse();
    let mut arg_ptrs = Vec::new();
    for a in argv.iter().rev() {
        arg_ptrs.push(push_bytes(mm, ctx, &with_nul(a))?);
    }
    arg_ptrs.reverse();
    let platform = push_bytes(mm, ctx, b"x86_64\0")?;
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the local buffer.
    unsafe { libc::getrandom(random.as_mut_ptr() as *mut _, 16, 0) };
    let random_ptr = push_bytes(mm, ctx, &random)?;
    let exe_path = main.file.path.clone();

    let mut auxv: Vec<(u64, u64)> = Vec::with_capacity(24);
    if let Some(ehdr) = vdso_ehdr {
        auxv.push((libc::AT_SYSINFO_EHDR, ehdr));
    }
    auxv.extend([
        (libc::AT_HWCAP, host.hwcap),
        (libc::AT_PAGESZ, PAGE_SIZE),
        (libc::AT_CLKTCK, 100),
        (libc::AT_PHDR, exe_loaded.phdr),
        (libc::AT_PHENT, main.header.e_phentsize as u64),
        (libc::AT_PHNUM, main.header.e_phnum as u64),
        (libc::AT_BASE, interp_base),
        (libc::AT_FLAGS, 0),
        (libc::AT_ENTRY, exe_loaded.entry),
        (libc::AT_UID, host.uid as u64),
        (libc::AT_EUID, host.euid as u64),
        (libc::AT_GID, host.gid as u64),
        (libc::AT_EGID, host.egid as u64),
        (libc::AT_SECURE, 0),
        (libc::AT_RANDOM, random_ptr),
        (libc::AT_HWCAP2, 0),
        (libc::AT_EXECFN, execfn_ptr),
        (libc::AT_PLATFORM, platform),
        (51, host.minsigstksz), // AT_MINSIGSTKSZ
        (libc::AT_NULL, 0),
    ]);
    let words = 1 + arg_ptrs.len() + 1 + env_ptrs.len() + 1 + auxv.len() * 2;
    sp &= !15;
    if words % 2 == 1 {
        sp -= 8;
    }
    let mut table: Vec<u64> = Vec::with_capacity(words);
    table.push(arg_ptrs.len() as u64);
    table.extend(&arg_ptrs);
    table.push(0);
    table.extend(&env_ptrs);
    table.push(0);
    for (k, v) in auxv {
        table.push(k);
        table.push(v);
    }
    let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_le_bytes()).collect();
    sp -= bytes.len() as u64;
    mm.write(ctx, sp, &bytes).map_err(nomem)?;
    Ok(StartInfo {
        entry,
        stack_pointer: sp,
        exe: exe_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_forms() {
        assert_eq!(
            parse_shebang(b"#!/bin/sh\necho"),
            Some((b"/bin/sh".to_vec(), None))
        );
        assert_eq!(
            parse_shebang(b"#! /usr/bin/env  python3 \n"),
            Some((b"/usr/bin/env".to_vec(), Some(b"python3".to_vec())))
        );
        assert_eq!(parse_shebang(b"#!\n"), None);
        assert_eq!(parse_shebang(b"\x7fELF"), None);
    }

    #[test]
    fn path_lookup() {
        assert!(resolve_program("sh", Some(OsStr::new("/usr/bin:/bin"))).is_ok());
        assert!(matches!(
            resolve_program("no-such-program-vmwrap", Some(OsStr::new("/usr/bin"))),
            Err(ExecError::NotFound(_))
        ));
        assert!(matches!(
            resolve_program("/no/such/file", None),
            Err(ExecError::NotFound(_))
        ));
    }
}
