/* SPDX-License-Identifier: Apache-2.0 */
/* The private MPS daemon (moe_mps.h). Every command goes to
 * nvidia-cuda-mps-control with our two directories in its environment; the
 * daemon's own output goes to a file in the log directory, never to our
 * stdout (a daemon holding the test's stdout open would keep the test
 * runner waiting for its end). Only processes whose ids our private daemon
 * reported (its pid file, its server list) are ever signalled. */
#include "tests/support/moe_mps.h"

#include <cuda_runtime_api.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MPS_ENV_PIPE "CUDA_MPS_PIPE_DIRECTORY"
#define MPS_ENV_LOG "CUDA_MPS_LOG_DIRECTORY"
#define MPS_CMD_TIMEOUT_MS 15000    /* one control command */
#define MPS_PROBE_TIMEOUT_MS 90000  /* the first client (the server starts then) */
#define MPS_GONE_TIMEOUT_MS 10000   /* the daemon ends after `quit` */
#define MPS_KILL_GRACE_MS 2000
#define MPS_POLL_MS 20
#define MPS_OUT_MAX 4096
#define MPS_MAX_FD 1024
#define MPS_RETRY_MS 500            /* between probes of a recovering server */

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int on_path(const char* name) {
  const char* path = getenv("PATH");
  if (path == NULL) path = "/usr/bin:/bin";
  char dir[PATH_MAX];
  for (const char* p = path; *p != '\0';) {
    const char* end = strchr(p, ':');
    const size_t n = end != NULL ? (size_t)(end - p) : strlen(p);
    if (n > 0 && n + strlen(name) + 2 < sizeof(dir)) {
      snprintf(dir, sizeof(dir), "%.*s/%s", (int)n, p, name);
      if (access(dir, X_OK) == 0) return 1;
    }
    if (end == NULL) break;
    p = end + 1;
  }
  return 0;
}

/* Waits for our child `pid` until timeoutMs, then kills it; its status, or -1. */
static int wait_child(pid_t pid, int timeoutMs) {
  const long long deadline = now_ms() + timeoutMs;
  for (;;) {
    int st = 0;
    const pid_t w = waitpid(pid, &st, WNOHANG);
    if (w == pid) return st;
    if (w < 0) return -1;
    if (now_ms() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, NULL, 0);
      return -1;
    }
    usleep(MPS_POLL_MS * 1000);
  }
}

/* In a child about to exec: our directories, plain stdio. */
static void child_setup(const moe_mps_t* m, int in, int out) {
  setenv(MPS_ENV_PIPE, m->pipeDir, 1);
  setenv(MPS_ENV_LOG, m->logDir, 1);
  if (in >= 0) dup2(in, STDIN_FILENO);
  if (out >= 0) {
    dup2(out, STDOUT_FILENO);
    dup2(out, STDERR_FILENO);
  }
}

/* `nvidia-cuda-mps-control -d`: the daemon's output to log/start.txt. */
static int mps_start_daemon(const moe_mps_t* m) {
  char logPath[PATH_MAX + 16];
  snprintf(logPath, sizeof(logPath), "%s/start.txt", m->logDir);
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    const int devnull = open("/dev/null", O_RDONLY);
    const int log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    child_setup(m, devnull, log);
    for (int fd = STDERR_FILENO + 1; fd < MPS_MAX_FD; fd++) close(fd);
    execlp(MOE_MPS_CONTROL, MOE_MPS_CONTROL, "-d", (char*)NULL);
    _exit(127);
  }
  const int st = wait_child(pid, MPS_CMD_TIMEOUT_MS);
  return st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* One command on the control daemon's stdin; its answer into out. */
static int mps_command(const moe_mps_t* m, const char* cmd, char* out, size_t outLen) {
  int in[2], outp[2];
  if (out != NULL && outLen > 0) out[0] = '\0';
  if (pipe2(in, O_CLOEXEC) != 0) return -1;
  if (pipe2(outp, O_CLOEXEC) != 0) {
    close(in[0]), close(in[1]);
    return -1;
  }
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    close(in[0]), close(in[1]), close(outp[0]), close(outp[1]);
    return -1;
  }
  if (pid == 0) {
    child_setup(m, in[0], outp[1]);
    for (int fd = STDERR_FILENO + 1; fd < MPS_MAX_FD; fd++) close(fd);
    execlp(MOE_MPS_CONTROL, MOE_MPS_CONTROL, (char*)NULL);
    _exit(127);
  }
  close(in[0]);
  close(outp[1]);
  signal(SIGPIPE, SIG_IGN);
  if (write(in[1], cmd, strlen(cmd)) < 0 || write(in[1], "\n", 1) < 0) { /* the command's answer tells */
  }
  close(in[1]);
  size_t have = 0;
  const long long deadline = now_ms() + MPS_CMD_TIMEOUT_MS;
  for (;;) {
    const long long left = deadline - now_ms();
    if (left <= 0) break;
    struct pollfd p = {.fd = outp[0], .events = POLLIN};
    if (poll(&p, 1, (int)left) <= 0) break;
    char buf[256];
    const ssize_t r = read(outp[0], buf, sizeof(buf));
    if (r <= 0) break;
    if (out != NULL && have + 1 < outLen) {
      const size_t k = (size_t)r < outLen - 1 - have ? (size_t)r : outLen - 1 - have;
      memcpy(out + have, buf, k);
      have += k;
      out[have] = '\0';
    }
  }
  close(outp[0]);
  const int st = wait_child(pid, MPS_CMD_TIMEOUT_MS);
  return st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* The control daemon's pid, from the pid file it keeps in the pipe dir. */
static pid_t mps_daemon_pid(const moe_mps_t* m) {
  DIR* d = opendir(m->pipeDir);
  if (d == NULL) return 0;
  pid_t pid = 0;
  struct dirent* e;
  while ((e = readdir(d)) != NULL && pid == 0) {
    const size_t n = strlen(e->d_name);
    if (n < 4 || strcmp(e->d_name + n - 4, ".pid") != 0) continue;
    char path[PATH_MAX + 256];
    snprintf(path, sizeof(path), "%s/%s", m->pipeDir, e->d_name);
    FILE* f = fopen(path, "r");
    long v = 0;
    if (f != NULL && fscanf(f, "%ld", &v) == 1 && v > 1) pid = (pid_t)v;
    if (f != NULL) fclose(f);
  }
  closedir(d);
  return pid;
}

static int alive(pid_t pid) { return pid > 1 && (kill(pid, 0) == 0 || errno == EPERM); }

/* Waits for `pid` (not our child) to end; TERM, then KILL after a grace. */
static void end_process(pid_t pid, int waitMs) {
  long long deadline = now_ms() + waitMs;
  while (alive(pid) && now_ms() < deadline) usleep(MPS_POLL_MS * 1000);
  if (!alive(pid)) return;
  kill(pid, SIGTERM);
  deadline = now_ms() + MPS_KILL_GRACE_MS;
  while (alive(pid) && now_ms() < deadline) usleep(MPS_POLL_MS * 1000);
  if (alive(pid)) kill(pid, SIGKILL);
}

static int rm_entry(const char* path, const struct stat* sb, int flag, struct FTW* ftw) {
  (void)sb, (void)flag, (void)ftw;
  remove(path);
  return 0;
}

/* quit, then make sure: the daemon and the server it reported are gone. */
static void mps_shutdown(moe_mps_t* m) {
  const pid_t daemon = mps_daemon_pid(m);
  mps_command(m, "quit", NULL, 0);
  if (daemon > 0) end_process(daemon, MPS_GONE_TIMEOUT_MS);
  if (m->serverPid > 1) end_process((pid_t)m->serverPid, MPS_KILL_GRACE_MS);
  nftw(m->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A process in a session of its own that stops the daemon when our end of
 * its pipe closes without a 'q' first (this process died). */
static int start_janitor(moe_mps_t* m) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) return -1;
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    close(p[0]), close(p[1]);
    return -1;
  }
  if (pid == 0) {
    setsid();
    const int devnull = open("/dev/null", O_RDWR);
    dup2(devnull, STDIN_FILENO), dup2(devnull, STDOUT_FILENO), dup2(devnull, STDERR_FILENO);
    for (int fd = STDERR_FILENO + 1; fd < MPS_MAX_FD; fd++)
      if (fd != p[0]) close(fd);
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    char c = 0;
    ssize_t r;
    do r = read(p[0], &c, 1);
    while (r < 0 && errno == EINTR);
    if (r == 1 && c == 'q') _exit(0);
    mps_shutdown(m);
    _exit(0);
  }
  close(p[0]);
  m->janitor = pid;
  m->janitorFd = p[1];
  return 0;
}

/* A CUDA client through the daemon, in a child (this process must not make
 * a CUDA context). */
static int mps_probe(moe_mps_t* m) {
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    const cudaError_t e = cudaSetDevice(0) != cudaSuccess ? cudaGetLastError() : cudaFree(NULL);
    if (e != cudaSuccess) fprintf(stderr, "MPS probe: %s\n", cudaGetErrorString(e));
    _exit(e == cudaSuccess ? 0 : 1);
  }
  const int st = wait_child(pid, MPS_PROBE_TIMEOUT_MS);
  if (st < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) return -1;
  char out[MPS_OUT_MAX];
  if (mps_command(m, "get_server_list", out, sizeof(out)) == 0) m->serverPid = strtol(out, NULL, 10);
  return 0;
}

static void tail_log(const moe_mps_t* m, const char* name, char* buf, size_t n) {
  char path[PATH_MAX + 32];
  snprintf(path, sizeof(path), "%s/%s", m->logDir, name);
  FILE* f = fopen(path, "r");
  buf[0] = '\0';
  if (f == NULL) return;
  fseek(f, 0, SEEK_END);
  const long size = ftell(f);
  fseek(f, size > (long)n - 1 ? size - (long)n + 1 : 0, SEEK_SET);
  const size_t r = fread(buf, 1, n - 1, f);
  buf[r] = '\0';
  for (size_t i = 0; i < r; i++)
    if (buf[i] == '\n') buf[i] = ' ';
  fclose(f);
}

int moe_mps_start(moe_mps_t* m, moe_mps_mode_t mode) {
  memset(m, 0, sizeof(*m));
  m->janitorFd = -1;
  if (mode == MOE_MPS_OFF) {
    snprintf(m->why, sizeof(m->why), "not asked for");
    return 0;
  }
  if (getenv(MPS_ENV_PIPE) != NULL) {
    /* The caller runs a daemon of its own: its clients connect to it. */
    snprintf(m->why, sizeof(m->why), "%s is set: clients use that daemon, not a private one", MPS_ENV_PIPE);
    return 0;
  }
  if (!on_path(MOE_MPS_CONTROL)) {
    snprintf(m->why, sizeof(m->why), "%s is not on PATH: processes share the GPU in time slices", MOE_MPS_CONTROL);
    return 0;
  }
  snprintf(m->dir, sizeof(m->dir), "/tmp/nccl-moe-mps-XXXXXX");
  if (mkdtemp(m->dir) == NULL) {
    snprintf(m->why, sizeof(m->why), "cannot make a temporary directory: %s", strerror(errno));
    return 0;
  }
  snprintf(m->pipeDir, sizeof(m->pipeDir), "%s/pipe", m->dir);
  snprintf(m->logDir, sizeof(m->logDir), "%s/log", m->dir);
  if (mkdir(m->pipeDir, 0700) != 0 || mkdir(m->logDir, 0700) != 0 || start_janitor(m) != 0) {
    snprintf(m->why, sizeof(m->why), "cannot set up %s: %s", m->dir, strerror(errno));
    nftw(m->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
  }
  m->own = 1;
  setenv(MPS_ENV_PIPE, m->pipeDir, 1);
  setenv(MPS_ENV_LOG, m->logDir, 1);
  if (mps_start_daemon(m) != 0) {
    char log[256];
    tail_log(m, "start.txt", log, sizeof(log));
    snprintf(m->why, sizeof(m->why), "%s -d failed (%s): processes share the GPU in time slices", MOE_MPS_CONTROL, log);
    moe_mps_stop(m);
    return 0;
  }
  if (mps_probe(m) != 0) {
    char log[320];
    tail_log(m, "server.log", log, sizeof(log));
    snprintf(m->why, sizeof(m->why), "a CUDA client could not start through the private daemon (server log: %s): "
             "processes share the GPU in time slices", log[0] != '\0' ? log : "empty");
    moe_mps_stop(m);
    return 0;
  }
  m->on = 1;
  return 1;
}

const char* moe_mps_describe(const moe_mps_t* m, char* buf, size_t n) {
  if (m->on) snprintf(buf, n, "MPS: on (private daemon, pipe dir %s, server pid %ld)", m->pipeDir, m->serverPid);
  else snprintf(buf, n, "MPS: off (%s)", m->why);
  return buf;
}

void moe_mps_client_died(moe_mps_t* m, pid_t pid) {
  if (!m->on || m->serverPid <= 1) return;
  char cmd[96], out[MPS_OUT_MAX];
  snprintf(cmd, sizeof(cmd), "terminate_client %ld %d", m->serverPid, (int)pid);
  mps_command(m, cmd, out, sizeof(out));
}

int moe_mps_wait_ready(moe_mps_t* m, int timeoutMs) {
  if (!m->on) return 1;
  const long long deadline = now_ms() + timeoutMs;
  while (mps_probe(m) != 0) {
    if (now_ms() > deadline) return 0;
    usleep(MPS_RETRY_MS * 1000);
  }
  return 1;
}

void moe_mps_stop(moe_mps_t* m) {
  if (!m->own) return;
  mps_shutdown(m);
  if (m->janitorFd >= 0) {
    if (write(m->janitorFd, "q", 1) < 0) { /* the janitor is gone: nothing to tell */
    }
    close(m->janitorFd);
    m->janitorFd = -1;
  }
  if (m->janitor > 0) wait_child(m->janitor, MPS_CMD_TIMEOUT_MS);
  m->janitor = 0;
  unsetenv(MPS_ENV_PIPE);
  unsetenv(MPS_ENV_LOG);
  m->own = 0;
  m->on = 0;
}
