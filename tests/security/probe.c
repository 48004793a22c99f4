/* The hostile tenant's toolbox: one static binary the security battery copies into a sandbox and
 * runs there, whatever its image has (a busybox image has no compiler and no Python). Each command
 * tries one thing and prints one line: "ok ..." when the attempt succeeded, "ERR <errno> <name>"
 * when the kernel refused it. Every long-running attack ends on its own (alarm), so a failing test
 * cannot leave one running. Built by tests/security/conftest.py with `cc -static`. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <net/ethernet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int report(long result) {
  if (result < 0) {
    printf("ERR %d %s\n", errno, strerrorname_np(errno) ? strerrorname_np(errno) : "?");
    return 1;
  }
  printf("ok %ld\n", result);
  return 0;
}

static int cmd_read(const char *path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return report(-1);
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  if (n < 0) return report(-1);
  buf[n] = 0;
  printf("ok %s\n", buf);
  return 0;
}

static int cmd_pids(void) {
  DIR *d = opendir("/proc");
  if (!d) return report(-1);
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    char path[300], comm[64] = "";
    snprintf(path, sizeof path, "/proc/%s/comm", e->d_name);
    FILE *f = fopen(path, "r");
    if (f) {
      if (fgets(comm, sizeof comm, f)) comm[strcspn(comm, "\n")] = 0;
      fclose(f);
    }
    printf("%s %s\n", e->d_name, comm);
  }
  closedir(d);
  return 0;
}

static int cmd_connect(const char *host, int port, const char *request) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) return report(-1);
  struct timeval tv = {3, 0};
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  inet_pton(AF_INET, host, &a.sin_addr);
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) return report(-1);
  if (request) {
    char req[2048];
    int n = snprintf(req, sizeof req, "%s", request);
    for (int i = 0; i < n; i++) if (req[i] == '|') req[i] = '\n';  /* '|' stands for a newline */
    write(s, req, n);
  }
  char buf[512] = "";
  ssize_t n = read(s, buf, sizeof buf - 1);
  if (n > 0) buf[n] = 0;
  buf[strcspn(buf, "\r\n")] = 0;
  printf("ok connected %s\n", buf);
  return 0;
}

static int cmd_forkbomb(int seconds) {
  /* Every process dies after `seconds` (alarm is not inherited: each child sets its own). */
  alarm(seconds + 2);
  pid_t first = getpid();
  long forks = 0, failures = 0;
  time_t end = time(NULL) + seconds;
  while (time(NULL) < end) {
    pid_t p = fork();
    if (p == 0) { alarm(seconds + 2); continue; }
    if (p < 0) { failures++; usleep(10000); } else forks++;
  }
  if (getpid() != first) _exit(0);
  printf("ok forks=%ld failures=%ld\n", forks, failures);
  return 0;
}

static int cmd_membomb(long mib) {
  alarm(60);
  long got = 0;
  for (; got < mib; got++) {
    char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) break;
    memset(p, 1, 1 << 20);
  }
  printf("ok mib=%ld\n", got);
  return 0;
}

static int cmd_fill(const char *path, long mib) {
  alarm(120);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return report(-1);
  static char block[1 << 20];
  memset(block, 'x', sizeof block);
  long written = 0;
  int err = 0;
  while (written < mib << 20) {
    ssize_t n = write(fd, block, sizeof block);
    if (n <= 0) { err = errno; break; }
    written += n;
  }
  fsync(fd);
  close(fd);
  printf("ok written_mib=%ld errno=%d\n", written >> 20, err);
  return 0;
}

static int cmd_files(int count) {
  int opened = 0, err = 0;
  for (; opened < count; opened++) {
    if (open("/dev/null", O_RDONLY) < 0) { err = errno; break; }
  }
  printf("ok opened=%d errno=%d\n", opened, err);
  return 0;
}

static int cmd_spin(int seconds, int workers) {
  for (int i = 1; i < workers; i++) if (fork() == 0) break;
  alarm(seconds + 5);
  time_t end = time(NULL) + seconds;
  volatile unsigned long x = 0;
  while (time(NULL) < end) x++;
  printf("ok spun\n");
  return 0;
}

static int cmd_ids(void) {
  uid_t r, e, s;
  getresuid(&r, &e, &s);
  printf("ok ruid=%d euid=%d\n", r, e);
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (argc < 2) { fprintf(stderr, "usage: probe COMMAND ...\n"); return 2; }
  const char *c = argv[1];
  const char *a2 = argc > 2 ? argv[2] : "", *a3 = argc > 3 ? argv[3] : "";
  if (!strcmp(c, "read")) return cmd_read(a2);
  if (!strcmp(c, "pids")) return cmd_pids();
  if (!strcmp(c, "kill")) return report(kill(atoi(a2), SIGKILL));
  if (!strcmp(c, "connect")) return cmd_connect(a2, atoi(a3), argc > 4 ? argv[4] : NULL);
  if (!strcmp(c, "mount")) return report(mount("none", "/mnt", "tmpfs", 0, NULL));
  if (!strcmp(c, "mount-proc")) return report(mount("proc", "/mnt", "proc", 0, NULL));
  if (!strcmp(c, "unshare-user")) return report(unshare(CLONE_NEWUSER));
  if (!strcmp(c, "unshare-mount")) return report(unshare(CLONE_NEWNS));
  if (!strcmp(c, "unshare-net")) return report(unshare(CLONE_NEWNET));
  if (!strcmp(c, "setns")) {
    int fd = open(a2, O_RDONLY);
    if (fd < 0) return report(-1);
    return report(setns(fd, 0));
  }
  if (!strcmp(c, "ptrace")) return report(ptrace(PTRACE_ATTACH, atoi(a2), NULL, NULL));
  if (!strcmp(c, "module")) return report(syscall(SYS_init_module, "", 0UL, ""));
  if (!strcmp(c, "finit-module")) {
    int fd = open("/dev/null", O_RDONLY);
    return report(syscall(SYS_finit_module, fd, "", 0));
  }
  if (!strcmp(c, "write")) {
    int fd = open(a2, O_WRONLY);
    if (fd < 0) return report(-1);
    return report(write(fd, a3, strlen(a3)));
  }
  if (!strcmp(c, "mknod")) return report(mknod(a2, S_IFBLK | 0600, makedev(8, 0)));
  if (!strcmp(c, "settime")) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 3600 * 24 * 365;
    return report(clock_settime(CLOCK_REALTIME, &ts));
  }
  if (!strcmp(c, "sethostname")) return report(sethostname(a2, strlen(a2)));
  if (!strcmp(c, "raw-inet")) return report(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
  if (!strcmp(c, "raw-packet")) return report(socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ARP)));
  if (!strcmp(c, "keyctl")) return report(syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
  if (!strcmp(c, "bpf")) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    return report(syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr));
  }
  if (!strcmp(c, "perf")) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    return report(syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0));
  }
  if (!strcmp(c, "kexec")) return report(syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL));
  if (!strcmp(c, "forkbomb")) return cmd_forkbomb(atoi(a2));
  if (!strcmp(c, "membomb")) return cmd_membomb(atol(a2));
  if (!strcmp(c, "fill")) return cmd_fill(a2, atol(a3));
  if (!strcmp(c, "files")) return cmd_files(atoi(a2));
  if (!strcmp(c, "spin")) return cmd_spin(atoi(a2), atoi(a3));
  if (!strcmp(c, "ids")) return cmd_ids();
  fprintf(stderr, "unknown command %s\n", c);
  return 2;
}
