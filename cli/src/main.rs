//! `swarmnet`: parses the command line, runs it (see the library) and maps the outcome to the exit
//! code: 0 ok, 1 failed, 2 usage (clap's parse errors exit 2 on their own).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use swarmnet_cli::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match swarmnet_cli::run(cli) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(out.stdout.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // A closed pipe (`swarmnet node ls | head`): nothing more to say.
                return ExitCode::from(1);
            }
            out.code
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
