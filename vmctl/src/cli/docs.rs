//! `vmctl generate-docs DIR` (hidden): writes the man pages and shell completions
//! from the same clap definitions the command line is parsed with, so they cannot
//! drift from it. The packaging script (contrib/build-deb) runs it.

use clap::{Args, CommandFactory};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct GenerateDocsArgs {
    /// Writes DIR/man/*.1 and DIR/completions/{vmctl.bash,_vmctl,vmctl.fish}
    pub dir: PathBuf,
}

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    let mut page = Vec::new();
    // clap names are &'static str; this one-shot command can afford the leak.
    let name_static: &'static str = Box::leak(name.to_string().into_boxed_str());
    clap_mangen::Man::new(cmd.clone().name(name_static)).render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)
}

pub fn generate(args: GenerateDocsArgs) -> i32 {
    let result = (|| -> std::io::Result<()> {
        let man = args.dir.join("man");
        let completions = args.dir.join("completions");
        std::fs::create_dir_all(&man)?;
        std::fs::create_dir_all(&completions)?;
        let mut cmd = super::Cli::command();
        cmd.build();
        write_man(&cmd, "vmctl", &man)?;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let name = format!("vmctl-{}", sub.get_name());
            write_man(sub, &name, &man)?;
        }
        use clap_complete::{generate_to, Shell};
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            generate_to(shell, &mut super::Cli::command(), "vmctl", &completions)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmctl: generate-docs {}: {e}", args.dir.display());
            super::EXIT_VMCTL_FAILED
        }
    }
}
